//! Bad Qairtfiles: exit status 2, `Qairtfile:LINE:COL`, a caret and a hint, and nothing run
//! (after just's tests/error_messages.rs). Every case also declares a harmless rule that
//! would create `ran.txt`, so "nothing ran" is observable.

use crate::support::Space;

/// A rule that would run if qbuild ran anything.
const HARMLESS: &str = "[rule.ok]\noutputs = [\"ran.txt\"]\ncommand = \"echo ran > ran.txt\"\n";

/// Run qbuild on `qairtfile`; check it refused it before running anything; return stderr.
#[track_caller]
fn refuse(qairtfile: &str) -> String {
    let s = Space::new();
    s.write("Qairtfile", qairtfile);
    let out = s.run(["all"]);
    out.assert_code(2);
    out.assert_error_event();
    assert_eq!(
        s.files(),
        vec!["Qairtfile".to_string()],
        "nothing may run or be written\n{out}"
    );
    assert!(
        !s.exists(".qbuild"),
        "no state for a refused Qairtfile\n{out}"
    );
    assert!(!out.stderr.contains("panicked"), "{out}");
    out.stderr
}

/// The message's first line and position, for the cases not compared verbatim.
#[track_caller]
fn refuse_at(qairtfile: &str, message: &str, position: &str) -> String {
    let err = refuse(qairtfile);
    let first = err.lines().next().unwrap_or_default();
    assert_eq!(first, format!("error: {message}"), "\n{err}");
    assert!(
        err.contains(&format!("--> {position}\n")),
        "expected the position {position}\n{err}"
    );
    err
}

#[test]
fn unknown_variable() {
    let q = format!(
        "[vars]\nnum_splits = 4\n\n{HARMLESS}\n[rule.split]\nmatrix = {{ split = [1, 2] }}\noutputs = [\"s/part_${{split}}_of_${{num_split}}.txt\"]\ncommand = \"touch ${{outputs}}\"\n"
    );
    assert_eq!(
        refuse(&q),
        "error: unknown variable `num_split`
  --> Qairtfile:10:32
   |
10 | outputs = [\"s/part_${split}_of_${num_split}.txt\"]
   |                                ^^^^^^^^^^^^
   = hint: did you mean `num_splits`?
"
    );
}

#[test]
fn toml_syntax_error() {
    let q = format!("{HARMLESS}\n[rule.bad]\noutputs = [\"x.txt\"]\ncommand = \"echo x > x.txt\n");
    assert_eq!(
        refuse(&q),
        "error: invalid TOML: invalid basic string, expected `\"`
 --> Qairtfile:7:26
  |
7 | command = \"echo x > x.txt
  |                          ^
"
    );
}

#[test]
fn dependency_cycle_between_two_rules() {
    let q = format!(
        "{HARMLESS}
[rule.a]
inputs = [\"b.txt\"]
outputs = [\"a.txt\"]
command = \"cat b.txt > a.txt\"

[rule.b]
inputs = [\"a.txt\"]
outputs = [\"b.txt\"]
command = \"cat a.txt > b.txt\"
"
    );
    assert_eq!(
        refuse(&q),
        "error: dependency cycle: a -> b -> a
 --> Qairtfile:5:7
  |
5 | [rule.a]
  |       ^
  = hint: `a` (which writes `a.txt`) ends up depending on its own output
"
    );
}

/// An output inside another job's folder output would make that folder look hand-edited
/// whenever the inner file's job ran (its folder job then reran for nothing, as found
/// by hand). Refused wherever the two rules are in the file; within one job it is fine.
#[test]
fn an_output_inside_another_jobs_folder_output_is_refused() {
    let inner_first = format!(
        "{HARMLESS}
[rule.inner]
outputs = [\"sha/ar1/b.onnx\"]
command = \"mkdir -p sha/ar1 && echo b > sha/ar1/b.onnx\"

[rule.folder]
outputs = [\"sha\"]
command = \"mkdir -p sha && echo a > sha/a.onnx\"
"
    );
    assert_eq!(
        refuse(&inner_first),
        "error: `sha/ar1/b.onnx` is inside `sha`, an output of `folder`
 --> Qairtfile:6:12
  |
6 | outputs = [\"sha/ar1/b.onnx\"]
  |            ^^^^^^^^^^^^^^^^
  = hint: a folder output belongs to one job (`folder`, at Qairtfile:10:12): write `sha/ar1/b.onnx` elsewhere, or make it in that job
"
    );
    // One job writing a folder and a file in it: accepted, and a reader of the file
    // depends on that job.
    let s = Space::new();
    s.write(
        "Qairtfile",
        "[rule.folder]\noutputs = [\"sha\", \"sha/a.onnx\"]\ncommand = \"mkdir -p sha && echo a > sha/a.onnx\"\n\n\
         [rule.reader]\ninputs = [\"sha/a.onnx\"]\noutputs = [\"r.txt\"]\ncommand = \"cat sha/a.onnx > r.txt\"\n",
    );
    s.run(["all"]).assert_ok();
    assert_eq!(s.read_string("r.txt"), "a\n");
    s.run(["all"]).assert_nothing_ran(2);
}

/// A job reading a folder that holds its own output would never be up to date (its output
/// changes its input), and one reading the work folder (or `.qbuild/`) reads the state
/// qbuild writes on every run: both refused at load.
#[test]
fn a_job_that_would_read_what_it_or_qbuild_writes_is_refused() {
    let own = format!(
        "{HARMLESS}
[rule.a]
inputs = [\"models\"]
outputs = [\"models/index.txt\"]
command = \"ls models > models/index.txt\"
"
    );
    assert_eq!(
        refuse(&own),
        "error: `a` reads `models`, which holds `models/index.txt`, one of its own outputs
 --> Qairtfile:6:11
  |
6 | inputs = [\"models\"]
  |           ^^^^^^^^
  = hint: a job cannot read what it writes: write the output elsewhere, or read only the files it needs
"
    );
    for (input, says) in [
        (".", "holds qbuild's own state folder (.qbuild/)"),
        ("sub/../..", "holds qbuild's own state folder (.qbuild/)"),
        (".qbuild/journal", "is inside qbuild's own state folder"),
    ] {
        refuse_at(
            &format!(
                "{HARMLESS}\n[rule.a]\ninputs = [\"{input}\"]\noutputs = [\"a.txt\"]\ncommand = \"true\"\n"
            ),
            &format!("input `{input}` {says}"),
            "Qairtfile:6:11",
        );
    }
}

/// The work folder, or `.qbuild/`, named from outside (an absolute path, `../` back in, a
/// link target, a tool) is refused like `.` is: its reader would never be up to date. A
/// path that leads back inside names the same file as a rule's output, so the reader waits.
#[test]
fn the_work_folder_named_from_outside_is_refused_and_paths_back_inside_are_its_files() {
    #[track_caller]
    fn refused(out: &crate::support::Output, says: &str) {
        out.assert_code(2);
        assert!(out.stderr.contains(says), "{out}");
    }
    let s = Space::new();
    let root = s.path().to_string_lossy().into_owned();
    let name = s.path().file_name().unwrap().to_string_lossy().into_owned();
    let parent = s.path().parent().unwrap().to_string_lossy().into_owned();
    for (line, says) in [
        (
            format!("inputs = [\"{root}\"]"),
            "holds qbuild's own state folder (.qbuild/)",
        ),
        (
            format!("inputs = [\"../{name}\"]"),
            "holds qbuild's own state folder (.qbuild/)",
        ),
        (
            format!("inputs = [\"{parent}\"]"),
            "holds qbuild's own state folder (.qbuild/)",
        ),
        (
            format!("inputs = [\"{root}/.qbuild/journal\"]"),
            "is inside qbuild's own state folder",
        ),
        (
            "tools = [\".\"]".to_string(),
            "holds qbuild's own state folder (.qbuild/)",
        ),
    ] {
        s.write(
            "Qairtfile",
            format!("[rule.a]\n{line}\noutputs = [\"a.txt\"]\ncommand = \"true\"\n"),
        );
        let out = s.run(["--check"]);
        refused(&out, says);
        assert!(out.stderr.contains("--> Qairtfile:2:"), "{line}\n{out}");
    }
    // The same through a symlink to the work folder, as `-C` (or the shell's `cd`) names it.
    let t = Space::new();
    std::os::unix::fs::symlink(s.path(), t.join("lnk")).expect("symlink");
    let via = t.path().to_string_lossy().into_owned();
    s.write(
        "Qairtfile",
        format!("[rule.a]\ninputs = [\"{via}/lnk\"]\noutputs = [\"a.txt\"]\ncommand = \"true\"\n"),
    );
    let out = t.qbuild(["-C", "lnk", "--check"]).env("PWD", &via).run();
    refused(&out, "holds qbuild's own state folder");
    // ...and however qbuild was started: the link itself leads into the work folder.
    refused(&s.run(["--check"]), "holds qbuild's own state folder");
    s.write(
        "Qairtfile",
        "[rule.l]\nlinks = [{ link = \"l\", to = \".qbuild/snapshot\" }]\n",
    );
    refused(&s.run(["--check"]), "into qbuild's own state folder");

    s.write(
        "Qairtfile",
        format!(
            "[rule.w]\noutputs = [\"a\"]\ncommand = \"sleep 0.3; echo a > a\"\n[rule.r]\ninputs = [\"{root}/a\", \"../{name}/a\", \"{via}/lnk/a\"]\noutputs = [\"o\"]\ncommand = \"cat a > o\"\n"
        ),
    );
    // (The three names of `a`, the last through a link to the work folder, are one file:
    // the reader waits for it, and settles.)
    s.run(["--check"]).assert_ok();
    s.run(["-j2", "all"]).assert_ok();
    assert_eq!(s.read_string("o"), "a\n");
    s.run(["all"]).assert_nothing_ran(2);
}

/// A cycle closed by a folder: `a` reads `models/`, `b` writes into it from `a`'s output.
/// Regression: the cycle was named `a -> b`, the edge through the folder left out.
#[test]
fn a_cycle_through_a_folder_is_named_whole() {
    let q = format!(
        "{HARMLESS}
[rule.a]
inputs = [\"models\"]
outputs = [\"out/a.txt\"]
command = \"ls models > out/a.txt\"

[rule.b]
inputs = [\"out/a.txt\"]
outputs = [\"models/gen.txt\"]
command = \"cat out/a.txt > models/gen.txt\"
"
    );
    assert_eq!(
        refuse(&q),
        "error: dependency cycle: a -> b -> a
 --> Qairtfile:5:7
  |
5 | [rule.a]
  |       ^
  = hint: `a` (which writes `out/a.txt`) ends up depending on its own output (a job that reads a folder waits for every job that writes into it, and one that reads a file inside another job's folder output waits for that job)
"
    );
}

#[test]
fn two_rules_write_one_path() {
    let q = format!(
        "{HARMLESS}
[rule.a]
outputs = [\"out.txt\"]
command = \"echo a > out.txt\"

[rule.b]
outputs = [\"./sub/../out.txt\"]
command = \"echo b > out.txt\"
"
    );
    assert_eq!(
        refuse(&q),
        "error: two rules write `out.txt`
  --> Qairtfile:10:12
   |
10 | outputs = [\"./sub/../out.txt\"]
   |            ^^^^^^^^^^^^^^^^^^
   = hint: `a` already writes it (at Qairtfile:6:12); every path has one producer
"
    );
}

#[test]
fn output_outside_the_work_folder() {
    let q = format!("{HARMLESS}\n[rule.a]\noutputs = [\"../x\"]\ncommand = \"echo a > ../x\"\n");
    assert_eq!(
        refuse(&q),
        "error: output `../x` is outside the work folder
 --> Qairtfile:6:12
  |
6 | outputs = [\"../x\"]
  |            ^^^^^^
  = hint: outputs are relative paths inside the folder that holds the Qairtfile
"
    );
    // Escaping through a subfolder, and absolute.
    refuse_at(
        &format!("{HARMLESS}\n[rule.a]\noutputs = [\"sub/../../x\"]\ncommand = \"true\"\n"),
        "output `sub/../../x` is outside the work folder",
        "Qairtfile:6:12",
    );
    refuse_at(
        &format!("{HARMLESS}\n[rule.a]\ncommand = \"true\"\noutputs = [\"/tmp/qbuild-e2e-abs\"]\n"),
        "output `/tmp/qbuild-e2e-abs` is outside the work folder",
        "Qairtfile:7:12",
    );
}

#[test]
fn output_inside_the_state_folder() {
    refuse_at(
        &format!("{HARMLESS}\n[rule.a]\noutputs = [\".qbuild/x\"]\ncommand = \"true\"\n"),
        "output `.qbuild/x` is inside qbuild's own state folder",
        "Qairtfile:6:12",
    );
}

#[test]
fn two_instances_of_one_rule_write_one_path() {
    // The matrix gives two jobs with the same output; the error names the first writer.
    let err = refuse(&format!(
        "{HARMLESS}\n[rule.a]\nmatrix = {{ split = [1, 2] }}\noutputs = [\"out.txt\"]\ncommand = \"true\"\n"
    ));
    assert!(
        err.starts_with("error: two instances of one rule write `out.txt`"),
        "{err}"
    );
    assert!(err.contains("--> Qairtfile:7:12\n"), "{err}");
    assert!(err.contains("`a split=1` already writes it"), "{err}");
}

/// Aliases are checked by every run, not only by `--check` (a build used to run green with
/// an alias naming a renamed output); one may not take a rule's or an output's name (it
/// silently won over the rule); a cycle is named whole (the first item of the alias, a
/// rule, was blamed).
#[test]
fn aliases_are_checked_by_every_run_and_cycles_named_whole() {
    let gen = "[rule.gen]\noutputs = [\"a.txt\"]\ncommand = \"echo a > a.txt\"\n";
    refuse_at(
        &format!("[alias]\nship = [\"a.txt\", \"b.txt\"]\n{gen}"),
        "unknown target `b.txt`: not a rule, an alias, or a path any rule writes",
        "Qairtfile:2:18",
    );
    refuse_at(
        &format!("[alias]\ngen = [\"a.txt\"]\n{gen}"),
        "alias `gen` has the name of a rule",
        "Qairtfile:2:1",
    );
    refuse_at(
        &format!("[alias]\n\"a.txt\" = [\"gen\"]\n{gen}"),
        "alias `a.txt` has the name of an output",
        "Qairtfile:2:1",
    );
    refuse_at(
        &format!("[alias]\nfoo = [\"gen\", \"bar\"]\nbar = [\"baz\"]\nbaz = [\"foo\"]\n{gen}"),
        "alias cycle: foo -> bar -> baz -> foo",
        "Qairtfile:2:1",
    );
    refuse_at(
        &format!("default = [\"nope\"]\n{gen}"),
        "unknown target `nope`: not a rule, an alias, or a path any rule writes",
        "Qairtfile:1:12",
    );
}

/// A job may not write the Qairtfile (`--clean` would then delete it).
#[test]
fn an_output_that_is_the_qairtfile_is_refused() {
    refuse_at(
        "[rule.a]\noutputs = [\"./Qairtfile\"]\ncommand = \"true\"\n",
        "output `./Qairtfile` is the Qairtfile itself",
        "Qairtfile:2:12",
    );
}

#[test]
fn variable_cycle() {
    let err = refuse_at(
        &format!("[vars]\na = \"${{b}}\"\nb = \"${{a}}\"\n\n{HARMLESS}\n[rule.x]\noutputs = [\"x_${{a}}\"]\ncommand = \"true\"\n"),
        "variable cycle: a -> b -> a",
        "Qairtfile:3:6",
    );
    assert!(err.contains("3 | b = \"${a}\""), "{err}");
}

#[test]
fn unknown_keys_get_a_hint() {
    let err = refuse_at(
        &format!("{HARMLESS}\n[rules.a]\noutputs = [\"x\"]\ncommand = \"true\"\n"),
        "unknown key `rules`",
        "Qairtfile:5:2",
    );
    assert!(err.contains("hint: did you mean `rule`?"), "{err}");
    let err = refuse_at(
        &format!("{HARMLESS}\n[rule.a]\noutputs = [\"x\"]\ncomand = \"true\"\n"),
        "unknown key `comand`",
        "Qairtfile:7:1",
    );
    assert!(err.contains("hint: did you mean `command`?"), "{err}");
}

#[test]
fn rules_need_outputs_and_one_action() {
    refuse_at(
        &format!("{HARMLESS}\n[rule.a]\ncommand = \"true\"\n"),
        "rule `a` has no `outputs`",
        "Qairtfile:5:7",
    );
    refuse_at(
        &format!(
            "{HARMLESS}\n[rule.a]\noutputs = [\"x\"]\ncommand = \"true\"\nargv = [\"true\"]\n"
        ),
        "rule `a` has more than one action",
        "Qairtfile:5:7",
    );
}

#[test]
fn a_bad_qairtfile_never_panics() {
    // Odd inputs: each must be refused with status 2 (not a panic, status 101).
    for q in [
        "\u{feff}[rule",
        "[rule.a]\noutputs = []\ncommand = \"true\"\n",
        "[rule.a]\noutputs = [\"x\"]\ncommand = \"${\"\n",
        "[rule.a]\nmatrix = { s = { range = [1, \"z\"] } }\noutputs = [\"x${s}\"]\ncommand = \"true\"\n",
        "[rule.a]\noutputs = [\"x${inputs[7]}\"]\ncommand = \"true\"\n",
        "[pool]\nq = -1\n[rule.a]\noutputs = [\"x\"]\ncommand = \"true\"\n",
        "[rule.a]\npool = \"nope\"\noutputs = [\"x\"]\ncommand = \"true\"\n",
        "[rule.a]\noutputs = [\"x\"]\ncommand = \"echo ${env:QBUILD_E2E_SURELY_UNSET}\"\n",
    ] {
        let s = Space::new();
        s.write("Qairtfile", q);
        let out = s.run(["all"]);
        assert_eq!(out.code, 2, "Qairtfile:\n{q}\n{out}");
        assert!(out.stderr.starts_with("error: "), "{out}");
        assert!(!s.exists("x"), "{out}");
    }
}

#[test]
fn a_non_utf8_qairtfile_is_refused() {
    let s = Space::new();
    s.write("Qairtfile", b"\xff\xfe[rule.a]\n");
    let out = s.run(["all"]);
    out.assert_code(2);
    assert!(out.stderr.starts_with("error: "), "{out}");
}

#[test]
fn an_unknown_target_is_refused_with_a_hint() {
    let s = Space::new();
    s.write("Qairtfile", HARMLESS);
    let out = s.run(["okk"]);
    out.assert_code(2);
    assert!(out.stderr.contains("unknown target `okk`"), "{out}");
    assert!(out.stderr.contains("did you mean `ok`?"), "{out}");
    // A mistyped output path is matched against the paths jobs write (it was only
    // matched against rule and alias names).
    let out = s.run(["ran.tx"]);
    out.assert_code(2);
    assert!(out.stderr.contains("did you mean `ran.txt`?"), "{out}");
    assert!(!s.exists("ran.txt"));
}

/// Regression: an alias named `all` was accepted and silently ignored.
#[test]
fn alias_named_all_is_refused() {
    let err = refuse(&format!("{HARMLESS}\n[alias]\nall = [\"x\"]\n"));
    assert!(err.contains("`all` is reserved"), "{err}");
}

/// Regression: `-j 0` was taken as `-j 1`. make refuses it and ninja reads it as "no limit"
/// (every ready QAIRT job at once); qbuild refuses it, as it does any `-j` that is not a
/// whole number of at least 1.
#[test]
fn jobs_must_be_one_or_more() {
    let s = Space::new();
    s.write("Qairtfile", HARMLESS);
    for (j, says) in [("0", "use 1 or more"), ("two", "a whole number of jobs")] {
        let out = crate::support::command(
            crate::support::QBUILD,
            s.path(),
            &["-j", j, "all"],
            &[] as &[(&str, &str)],
        )
        .output()
        .expect("run qbuild");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(
            stderr.starts_with(&format!(
                "error: invalid value '{j}' for '--jobs <N>': {says}"
            )),
            "{stderr}"
        );
        assert!(!s.exists("ran.txt"));
    }
    s.run(["all"]).assert_ok();
    assert!(s.exists("ran.txt"));
}

/// Regression: `-j 100000` (or `-j` at its largest) started that many threads up front,
/// and the system's refusal panicked (exit 101) even for a one-job build. Workers now
/// start as jobs are handed out, at most one per job running or queued.
#[test]
fn a_huge_jobs_count_runs_the_build() {
    let s = Space::new();
    s.write(
        "Qairtfile",
        "[rule.w]\nmatrix = { i = { range = [1, 20] } }\noutputs = [\"w${i}\"]\ncommand = \"echo ${i} > w${i}\"\n",
    );
    for j in ["100000", "4294967296", "18446744073709551615"] {
        let out = s.run(["-j", j, "all"]);
        out.assert_ok();
        assert!(!out.stderr.contains("panicked"), "{out}");
        s.run(["--clean"]).assert_ok();
    }
    assert!(!s.exists("w1"));
    s.run(["-j", "100000", "all"]).assert_ok();
    assert_eq!(s.read_string("w20"), "20\n");
}

/// Regression: `--trace FILE` wrote over whatever FILE was: the Qairtfile, an output (even
/// in a dry run, which "runs and removes nothing"), a source, `.qbuild/lock`. Such a path is
/// refused before anything runs; a path outside the build is written.
#[test]
fn a_trace_may_not_overwrite_a_file_of_the_build() {
    let s = Space::new();
    let qairtfile = "[rule.a]\ninputs = [\"src.txt\", \"tv\"]\noutputs = [\"a.txt\"]\ncommand = \"cat src.txt > a.txt\"\n";
    s.write("Qairtfile", qairtfile);
    s.write("src.txt", "source\n");
    s.write("tv/x", "x\n");
    std::os::unix::fs::symlink("Qairtfile", s.join("link-to-qairtfile")).expect("symlink");
    s.run(["all"]).assert_ok();
    // A link to an output not made yet (it created the output, holding the trace).
    s.remove("a.txt");
    std::os::unix::fs::symlink("a.txt", s.join("link-to-output")).expect("symlink");
    let before = s.snapshot();
    for (path, says) in [
        ("Qairtfile", "that is the Qairtfile"),
        ("link-to-qairtfile", "that is the Qairtfile"),
        ("a.txt", "that is a file of the build"),
        ("link-to-output", "that is a file of the build"),
        ("./src.txt", "that is a file of the build"),
        ("tv/trace.json", "that is inside tv, a folder of the build"),
        (".qbuild/lock", "that is in qbuild's state folder .qbuild/"),
    ] {
        for dry in [true, false] {
            let mut args = vec!["--trace", path, "all"];
            if dry {
                args.push("-n");
            }
            let out = s.run(args);
            out.assert_code(2);
            assert!(
                out.stderr
                    .starts_with(&format!("error: --trace {path}: {says}")),
                "{out}"
            );
        }
    }
    assert_eq!(s.snapshot(), before, "nothing was written");
    assert_eq!(s.read_string("Qairtfile"), qairtfile);
    assert!(!s.exists("a.txt"));
    s.run(["all"]).assert_ok();
    s.run(["--trace", "trace.json", "all"])
        .assert_nothing_ran(1);
    assert!(s.read_string("trace.json").contains("traceEvents"));
}

/// Regression: a work folder whose name is not UTF-8 was looked for under its lossy name,
/// so a Qairtfile that is there was "No such file or directory". Now it is said plainly.
#[test]
fn a_work_folder_path_that_is_not_utf8_is_named_as_such() {
    use std::os::unix::ffi::OsStrExt;
    let s = Space::new();
    let odd = s.path().join(std::ffi::OsStr::from_bytes(b"w\xffx"));
    std::fs::create_dir(&odd).expect("mkdir");
    std::fs::write(odd.join("Qairtfile"), HARMLESS).expect("write");
    for args in [&["--check"][..], &["all"][..]] {
        let out =
            crate::support::command(crate::support::QBUILD, &odd, args, &[] as &[(&str, &str)])
                .output()
                .expect("run qbuild");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains("is not valid UTF-8"), "{stderr}");
        assert!(!stderr.contains("No such file"), "{stderr}");
    }
    assert!(!odd.join("ran.txt").exists());
}

/// Regression: a file named `.qbuild` in the work folder gave "cannot create .../.qbuild:
/// File exists", which names no cause a user can act on.
#[test]
fn a_file_where_the_state_folder_goes_is_named() {
    let s = Space::new();
    s.write("Qairtfile", HARMLESS).write(".qbuild", "mine\n");
    let out = s.run(["all"]);
    out.assert_code(2);
    out.assert_error_event();
    assert!(
        out.stderr
            .contains("/.qbuild is not a folder, so qbuild cannot keep its state there"),
        "{out}"
    );
    assert_eq!(s.read_string(".qbuild"), "mine\n");
    assert!(!s.exists("ran.txt"));
}

/// Regression: arguments clap refused printed its message but no `--json` event, so a
/// script reading the events saw nothing at all before exit status 2.
#[test]
fn refused_arguments_give_the_json_error_event() {
    let s = Space::new();
    s.write("Qairtfile", HARMLESS);
    for (args, says) in [
        (
            &["-j", "0", "all"][..],
            "invalid value '0' for '--jobs <N>'",
        ),
        (
            &["--no-such-flag"][..],
            "unexpected argument '--no-such-flag'",
        ),
        (&["--check", "--status"][..], "cannot be used with"),
    ] {
        let out = s.run(args.iter().copied()); // with --json
        out.assert_code(2);
        assert_eq!(out.events.len(), 1, "{out}");
        let e = &out.events[0];
        assert_eq!(e["event"], "error", "{out}");
        assert_eq!(e["exit"], 2, "{out}");
        assert_eq!(e["at"], "", "{out}");
        let error = e["error"].as_str().unwrap_or_default();
        assert!(error.contains(says), "{out}");
        assert!(
            out.stderr.starts_with(&format!("error: {error}\n")),
            "the event carries stderr's first line\n{out}"
        );
        assert!(!s.exists("ran.txt"));
    }
    // Without --json, stdout stays empty.
    let out = s.qbuild(["-j", "0", "all"]).no_json().run();
    out.assert_code(2);
    assert!(out.events.is_empty(), "{out}");
}

/// Expansion that would exhaust memory or the stack ends in a located error instead: a
/// chain of variables that double each other (2^39 copies), 10,000 variables each naming
/// the next, 10,000 nested `${env:X:-...}` defaults, and a 4M-item list spliced into one
/// command. Each used to abort qbuild (out of memory, or a stack overflow).
#[test]
fn expansion_that_would_exhaust_memory_or_the_stack_is_refused() {
    let mut doubling = String::from("[vars]\nv0 = \"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\"\n");
    for i in 1..40 {
        doubling.push_str(&format!("v{i} = \"${{v{}}}${{v{}}}\"\n", i - 1, i - 1));
    }
    doubling.push_str(&format!(
        "{HARMLESS}[rule.r]\noutputs = [\"o\"]\ncommand = \"echo ${{v39}} > o\"\n"
    ));
    let err = refuse(&doubling);
    assert!(
        err.starts_with("error: this string expands to more than 16 MiB\n"),
        "{err}"
    );
    assert!(err.contains("--> Qairtfile:"), "{err}");

    let mut chain = String::from("[vars]\nv0 = \"x\"\n");
    for i in 1..10_000 {
        chain.push_str(&format!("v{i} = \"${{v{}}}\"\n", i - 1));
    }
    chain.push_str(&format!(
        "{HARMLESS}[rule.r]\noutputs = [\"${{v9999}}.txt\"]\ncommand = \"echo x > ${{outputs}}\"\n"
    ));
    let err = refuse(&chain);
    assert!(
        err.starts_with("error: variables refer to variables more than 200 deep here\n"),
        "{err}"
    );

    let nested = format!(
        "{HARMLESS}[rule.r]\noutputs = [\"o\"]\ncommand = \"echo {}y{} > o\"\n",
        "${env:QBUILD_TEST_UNSET:-".repeat(10_000),
        "}".repeat(10_000)
    );
    let err = refuse(&nested);
    assert!(
        err.starts_with("error: `${env:...:-...}` defaults nest more than 200 deep\n"),
        "{err}"
    );

    let wide = format!(
        "[vars]\nbig = {{ range = [1, 4000000] }}\n{HARMLESS}[rule.r]\nmatrix = {{ a = [1, 2] }}\noutputs = [\"o${{a}}\"]\ncommand = \"echo ${{big}} > ${{outputs}}\"\n"
    );
    refuse_at(
        &wide,
        "this string expands to more than 16 MiB",
        "Qairtfile:9:12",
    );
}

/// A `let` may share the name of a global that another global's value refers to: that
/// global never sees the let (it was taken for a cycle), and `|join:` keeps the spaces of
/// its separator.
#[test]
fn a_let_named_like_a_global_and_join_separators_with_spaces() {
    let s = Space::new();
    s.write(
        "Qairtfile",
        r#"
[vars]
name = "base"
g = "${name}-suffix"
xs = ["a", "b", "c"]
[rule.r]
let = { name = "${g}" }
outputs = ["${name}.txt"]
content = "[${xs|join: }] [${xs|join:, }] [${xs|join: - }]"
"#,
    );
    s.run(["all"]).assert_ok();
    assert_eq!(
        s.read_string("base-suffix.txt"),
        "[a b c] [a, b, c] [a - b - c]"
    );
}

/// What used to pass `--check` and fail only when run (or do something else): a NUL in a
/// string, an env name that is not one, `content` over two outputs, an `argv` that expands
/// to nothing; an alias naming an output by another spelling, or no name; `${...}` where
/// only names go; a Qairtfile that is a FIFO (it hung), a device (it read forever) or a folder.
#[test]
fn inconsistent_rules_are_refused_at_load_with_their_place() {
    for (q, message, position) in [
        ("[rule.r]\noutputs = [\"o\"]\ncommand = \"echo a\\u0000b > o\"\n", "this string holds a NUL character (`\\u0000`)", "Qairtfile:6:11"),
        ("[rule.r]\noutputs = [\"o\"]\nenv = { \"A=B\" = \"x\" }\ncommand = \"true\"\n", "`A=B` is not an environment variable name", "Qairtfile:6:9"),
        ("[rule.r]\noutputs = [\"o\"]\nenv = { QBUILD_RUN = \"x\" }\ncommand = \"true\"\n", "`QBUILD_RUN` is qbuild's own", "Qairtfile:6:9"),
        ("[vars]\ntwo = [\"a\", \"b\"]\n[rule.r]\noutputs = [\"o_${two}\"]\ncontent = \"hello\"\n", "`content` writes one output, but `r` has 2", "Qairtfile:7:11"),
        ("[vars]\nnone = []\n[rule.r]\noutputs = [\"o\"]\nargv = [\"${none}\"]\n", "`argv` of `r` names no program (it expands to nothing, or to an empty first word)", "Qairtfile:8:9"),
        ("[rule.r]\noutputs = [\"o\"]\ncommand = \"true\"\n[alias]\n\"./o\" = [\"r\"]\n", "alias `./o` has the name of an output", "Qairtfile:8:1"),
        ("[rule.r]\noutputs = [\"o\"]\ncommand = \"true\"\n[alias]\n\"\" = [\"r\"]\n", "`` cannot be an alias name", "Qairtfile:8:1"),
        ("[pool]\nq = 1\n[rule.r]\noutputs = [\"o\"]\npool = \"${p}\"\ncommand = \"true\"\n", "`${p}` in `pool` is a name, not a template", "Qairtfile:8:8"),
        ("[rule.r]\noutputs = [\"o\"]\ncommand = \"true\"\n[alias]\nx = [\"${t}\"]\n", "`${t}` in an alias is a name, not a template", "Qairtfile:8:6"),
    ] {
        refuse_at(&format!("{HARMLESS}{q}"), message, position);
    }
    let s = Space::new();
    s.mkdir("dir");
    let fifo = s.join("fifo");
    let c = std::ffi::CString::new(fifo.to_string_lossy().as_bytes()).unwrap();
    // SAFETY: mkfifo(3) on a NUL-terminated path we own.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    for (file, says) in [
        ("fifo", "it is not a regular file"),
        ("/dev/zero", "it is not a regular file"),
        ("dir", "it is a folder"),
    ] {
        let out = s.run(["-f", file, "--check"]);
        out.assert_code(2);
        assert!(out.stderr.contains(says), "{file}\n{out}");
    }
}

/// Positions and checks that did not hold: the column inside a string with escapes (it
/// pointed at the opening quote), on the first line after a byte-order mark (one too far);
/// an unknown variable in a rule with no instance (an empty matrix passed `--check`); and
/// a variable used only in the default of a set `${env:...}` (called unused, so `--check`
/// depended on the environment).
#[test]
fn escapes_a_bom_empty_matrices_and_env_defaults_are_checked() {
    refuse_at(
        &format!("{HARMLESS}[rule.r]\noutputs = [\"o\"]\ncommand = \"sh -c \\\"echo \\u00e9\\\" && echo ${{nope}} > o\"\n"),
        "unknown variable `nope`",
        "Qairtfile:6:42",
    );
    refuse_at(
        &format!("{HARMLESS}[rule.r]\nmatrix = {{ a = [] }}\noutputs = [\"${{typo}}.txt\"]\ncommand = \"true\"\n"),
        "unknown variable `typo`",
        "Qairtfile:6:13",
    );
    let s = Space::new();
    s.write("Qairtfile", "\u{feff}[rule.x.y]\noutputs = [\"a\"]\n");
    let out = s.run(["--check"]);
    out.assert_code(2);
    assert!(out.stderr.contains("--> Qairtfile:1:9\n"), "{out}");
    s.write(
        "Qairtfile",
        "[vars]\nfallback = \"sim-sdk\"\nsdk = \"${env:QBUILD_TEST_SET:-${fallback}}\"\n[rule.r]\noutputs = [\"o.txt\"]\ncommand = \"echo ${sdk} > ${outputs}\"\n",
    );
    s.qbuild(["--check"])
        .env("QBUILD_TEST_SET", "x")
        .run()
        .assert_ok();
    s.run(["--check"]).assert_ok();
    // A default that falls back on another environment variable is not needed, nor
    // evaluated, while the first one is set.
    s.write(
        "Qairtfile",
        "[rule.a]\noutputs = [\"a.out\"]\ncommand = \"echo ${env:QBUILD_TEST_SET:-${env:QBUILD_TEST_UNSET}} > a.out\"\n",
    );
    s.qbuild(["all"])
        .env("QBUILD_TEST_SET", "x")
        .run()
        .assert_ok();
    assert_eq!(s.read_string("a.out"), "x\n");
}

/// After a `\` line continuation in a `"""` string, a `${` first on the next line was
/// reported on the backslash (3:21), not where it is written.
#[test]
fn a_reference_after_a_line_continuation_is_placed_where_it_is_written() {
    let q = format!(
        "{HARMLESS}[rule.a]\noutputs = [\"x\"]\ncommand = \"\"\"echo a \\\n      ${{nope}}\"\"\"\n"
    );
    let err = refuse_at(&q, "unknown variable `nope`", "Qairtfile:7:7");
    assert!(
        err.contains("\n7 |       ${nope}\"\"\"\n  |       ^^^^^^^\n"),
        "the caret under `${{nope}}`\n{err}"
    );
    // Two continuations in a row, the second on a line of its own.
    let q = format!(
        "{HARMLESS}[rule.a]\noutputs = [\"x\"]\ncommand = \"\"\"echo a \\\n  \\\n\n\t${{nope}}\"\"\"\n"
    );
    refuse_at(&q, "unknown variable `nope`", "Qairtfile:9:2");
}

/// A Qairtfile that is not UTF-8 had its place only inside the message (no `-->`, no
/// line, `"at":""` in `--json`); it is now shown like every other error, its bad bytes
/// escaped rather than written raw to the terminal.
#[test]
fn a_qairtfile_that_is_not_utf8_is_located_like_any_error() {
    let s = Space::new();
    s.write("Qairtfile", b"a = \"\xff\"\n");
    let out = s.run(["all"]);
    out.assert_code(2).assert_error_event();
    assert_eq!(out.events[0]["at"], "Qairtfile:1:6", "{out}");
    assert_eq!(
        out.stderr,
        "error: the Qairtfile is not valid UTF-8 here
 --> Qairtfile:1:6
  |
1 | a = \"\\xFF\"
  |      ^^^^
  = hint: save it as UTF-8 text
"
    );
    // Further down, after a byte-order mark and text that is UTF-8: a lead byte that `(`
    // cannot continue, and another bad byte after it.
    s.write(
        "Qairtfile",
        b"\xef\xbb\xbf[vars]\nb = \"\xc3\xa9\xe2\x28 \xfe\"\r\n",
    );
    let out = s.run(["--check"]);
    out.assert_code(2).assert_error_event();
    assert!(
        out.stderr
            .contains(" --> Qairtfile:2:7\n  |\n2 | b = \"\u{e9}\\xE2( \\xFE\"\n  |       ^^^^\n"),
        "{out}"
    );
    assert!(!out.stderr.contains('\u{fffd}'), "{out}");
}

/// `min_version` compares leading numbers: `2.x` is 2, older than 2.28 (it passed as newer
/// than anything), and a version or `min_version` with no number is an error; a list variable in a `tools` path
/// stands for one tool per item (it was joined into one path with a space).
#[test]
fn toolchain_versions_must_be_numbers_and_tool_lists_multiply() {
    let s = Space::new();
    s.write("sdk/sdk.yaml", "version: 2.x\n")
        .write("sdk/bin/a", "#!/bin/sh\n");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(s.join("sdk/bin/a"), std::fs::Permissions::from_mode(0o755))
        .expect("chmod");
    let qf = |min: &str, tools: &str| {
        format!(
            "[vars]\nnames = [\"a\", \"b\"]\n[toolchain]\nroot = \"sdk\"\nmin_version = \"{min}\"\ntools = [{tools}]\n[rule.r]\noutputs = [\"o\"]\ncommand = \"echo ${{names}} > o\"\n"
        )
    };
    s.write("Qairtfile", qf("2.28", ""));
    let out = s.run(["--check"]);
    out.assert_code(2);
    assert!(
        out.stderr
            .contains("is version 2.x, older than the required 2.28"),
        "{out}"
    );
    s.write("sdk/sdk.yaml", "version: abc\n");
    let out = s.run(["--check"]);
    out.assert_code(2);
    assert!(out.stderr.contains("is version `abc`"), "{out}");
    s.write("sdk/sdk.yaml", "version: 2.31.0\n");
    s.write("Qairtfile", qf("abc", ""));
    let out = s.run(["--check"]);
    out.assert_code(2);
    assert!(
        out.stderr.contains("min_version `abc` is not a version"),
        "{out}"
    );
    s.write("Qairtfile", qf("v2.28", ""));
    s.run(["--check"]).assert_ok();
    s.write("Qairtfile", qf("2.28", "\"bin/${names}\""));
    let out = s.run(["--check"]);
    out.assert_code(2);
    assert!(
        out.stderr
            .contains("sdk/bin/b is missing or not executable"),
        "{out}"
    );
}

/// Rules that could only fail, or that say something the Qairtfile would never do, are
/// refused where they are written: an `argv` given as one command-line string, a `let`
/// hidden by a matrix variable of the same name, a rule named like another rule's output
/// (the target would mean both), a `content` that is empty without `allow_empty`.
#[test]
fn rules_that_cannot_mean_what_they_say_are_refused() {
    refuse_at(
        &format!("{HARMLESS}[rule.p]\noutputs = [\"o\"]\nargv = \"sh -c 'echo hi > o'\"\n"),
        "`argv` is a list: one string per argument, with no shell",
        "Qairtfile:6:8",
    );
    refuse_at(
        &format!("{HARMLESS}[vars]\ncmd = \"echo hi\"\n[rule.p]\noutputs = [\"o\"]\nargv = \"${{cmd}}\"\n"),
        "`argv` of `p` is one word with a space, `echo hi`: a program and its arguments are separate items",
        "Qairtfile:8:8",
    );
    refuse_at(
        &format!("{HARMLESS}[rule.p]\nmatrix = {{ x = [1, 2] }}\ncase = [{{ when = {{ x = 1 }}, let = {{ x = \"ONE\" }} }}]\noutputs = [\"o${{x}}\"]\ncommand = \"touch o${{x}}\"\n"),
        "let `x` has the name of a matrix variable of this rule, which always wins",
        "Qairtfile:6:37",
    );
    refuse_at(
        &format!("{HARMLESS}[rule.p]\noutputs = [\"o\"]\ncommand = \"touch o\"\n[rule.o]\noutputs = [\"o2\"]\ncommand = \"touch o2\"\n"),
        "rule `o` has the name of an output of rule `p`",
        "Qairtfile:7:7",
    );
    refuse_at(
        &format!("[alias]\nx = []\n{HARMLESS}"),
        "alias `x` names no target",
        "Qairtfile:2:1",
    );
    refuse_at(
        &format!("{HARMLESS}[rule.c]\noutputs = [\"c.txt\"]\ncontent = \"\"\n"),
        "the content of `c` is empty, and an empty output fails its job",
        "Qairtfile:6:11",
    );
    // A rule named for its own output means one thing either way; an argv string without
    // a space is one program; an empty content that is allowed is written.
    let s = Space::new();
    s.write(
        "Qairtfile",
        "[rule.o]\noutputs = [\"o\"]\nargv = \"./mk\"\n[rule.e]\noutputs = [\"e\"]\ncontent = \"\"\nallow_empty = true\n",
    )
    .write("mk", "#!/bin/sh\necho made > o\n");
    std::fs::set_permissions(
        s.join("mk"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    s.run(["all"]).assert_ok();
    assert_eq!(s.read_string("o"), "made\n");
    assert_eq!(s.read_string("e"), "");
}

/// `${env:X:-default}` takes the default when X is set but empty, as the shell's `:-`
/// does (`QNN_SDK_ROOT=` gave an SDK root of ""); `${env:X}` alone gives the empty value.
#[test]
fn an_empty_environment_variable_takes_its_default() {
    let s = Space::new();
    s.write(
        "Qairtfile",
        "[rule.o]\noutputs = [\"o\"]\ncommand = \"echo [${env:QBUILD_TEST_EMPTY:-sim-sdk}] [${env:QBUILD_TEST_EMPTY}] > o\"\n",
    );
    for (value, expected) in [("", "[sim-sdk] []\n"), ("sdk", "[sdk] [sdk]\n")] {
        s.qbuild(["all"])
            .env("QBUILD_TEST_EMPTY", value)
            .run()
            .assert_ok();
        assert_eq!(s.read_string("o"), expected, "QBUILD_TEST_EMPTY={value:?}");
    }
}

/// An integer written in hex, octal or binary is refused: a string got its decimal value,
/// so `chmod ${mode}` with `mode = 0o755` ran `chmod 493` in silence. Decimal integers,
/// with `_` or `+`, still give their value.
#[test]
fn a_number_not_written_in_decimal_is_refused() {
    for (written, value, column) in [("0o755", 493, 8), ("0x10", 16, 8), ("0b11", 3, 8)] {
        let err = refuse_at(
            &format!("{HARMLESS}[vars]\nmode = {written}\n[rule.r]\noutputs = [\"o\"]\ncommand = \"chmod ${{mode}} o\"\n"),
            &format!("`{written}` is not a decimal integer: a string would get its value, {value}"),
            &format!("Qairtfile:5:{column}"),
        );
        assert!(
            err.contains(&format!(
                "hint: write `{value}` for the value, or the string \"{written}\" for the text"
            )),
            "{err}"
        );
    }
    let s = Space::new();
    s.write(
        "Qairtfile",
        "[vars]\nbig = 1_000\nplus = +5\n[rule.r]\noutputs = [\"o\"]\ncommand = \"echo ${big} ${plus} > o\"\n",
    );
    s.run(["all"]).assert_ok();
    assert_eq!(s.read_string("o"), "1000 5\n");
}

/// An empty link path was "an link path is empty", and `.` (not empty: the work folder)
/// was called empty too, for outputs as for links.
#[test]
fn an_output_or_link_that_is_empty_or_the_work_folder_is_named_so() {
    for (q, message, position) in [
        (
            "[rule.r]\nlinks = [{ link = \"\", to = \"a\" }]\n",
            "a link path is empty",
            "Qairtfile:5:19",
        ),
        (
            "[rule.r]\nlinks = [{ link = \".\", to = \"a\" }]\n",
            "link `.` is the work folder itself",
            "Qairtfile:5:19",
        ),
        (
            "[rule.r]\noutputs = [\"\"]\ncommand = \"true\"\n",
            "an output path is empty",
            "Qairtfile:5:12",
        ),
        (
            "[rule.r]\noutputs = [\"sub/..\"]\ncommand = \"true\"\n",
            "output `sub/..` is the work folder itself",
            "Qairtfile:5:12",
        ),
    ] {
        let err = refuse_at(&format!("{HARMLESS}{q}"), message, position);
        if message.contains("itself") {
            assert!(
                err.ends_with("= hint: name a file or folder inside the work folder\n"),
                "{err}"
            );
        }
    }
}

/// An environment variable set to bytes that are not UTF-8 is said to be so, not "not set"
/// (and its default is not taken in silence).
#[test]
fn an_environment_variable_that_is_not_utf8_is_named() {
    use std::os::unix::ffi::OsStrExt;
    let s = Space::new();
    s.write(
        "Qairtfile",
        "[vars]\nv = \"${env:X:-d}\"\n[rule.o]\noutputs = [\"o${v}\"]\ncommand = \"touch o${v}\"\n",
    );
    let bad = std::ffi::OsStr::from_bytes(b"\xff");
    let out = crate::support::command(
        crate::support::QBUILD,
        s.path(),
        &["--check"],
        &[("X", bad)],
    )
    .output()
    .expect("run qbuild");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.starts_with("error: environment variable `X` is not valid UTF-8\n --> Qairtfile:2:6"),
        "{err}"
    );
}

/// Every variable a `let` names must exist, whether or not an instance uses the let (it is
/// evaluated only when one does): a typo in a let nothing uses yet, or in a case that never
/// matches, is found by `--check`. A let that names `${inputs}` for a command is fine, in a
/// rule with instances or without.
#[test]
fn unused_lets_are_checked_too() {
    refuse_at(
        &format!("{HARMLESS}[rule.a]\nlet = {{ n = \"${{nope}}\" }}\noutputs = [\"o\"]\ncommand = \"touch o\"\n"),
        "unknown variable `nope`",
        "Qairtfile:5:14",
    );
    refuse_at(
        &format!("{HARMLESS}[rule.a]\nmatrix = {{ x = [1, 2] }}\ncase = [{{ when = {{ x = 3 }}, let = {{ n = \"${{nope}}\" }} }}]\noutputs = [\"o${{x}}\"]\ncommand = \"touch o${{x}}\"\n"),
        "unknown variable `nope`",
        "Qairtfile:6:42",
    );
    for matrix in ["", "matrix = { x = [] }\n"] {
        let s = Space::new();
        s.write(
            "Qairtfile",
            format!("[rule.a]\n{matrix}let = {{ first = \"${{inputs[0]}}\" }}\ninputs = [\"i\"]\noutputs = [\"o\"]\ncommand = \"cat ${{first}} > o\"\n"),
        )
        .write("i", "hi\n");
        let check = s.run(["--check"]);
        check.assert_ok();
        // A rule with no jobs is valid, but --check points it out.
        assert_eq!(
            check
                .stderr
                .contains("qbuild: note: rule `a` has no jobs (its matrix is empty"),
            !matrix.is_empty(),
            "{check}"
        );
        s.run(["all"]).assert_ok();
        assert_eq!(s.exists("o"), matrix.is_empty());
    }
}

/// A `when` or `exclude` in a rule with no matrix had the hint "when names the rule's
/// matrix variables: " followed by nothing.
#[test]
fn a_when_or_exclude_without_a_matrix_says_so() {
    for (key, what) in [
        ("case = [{ when = { z = 1 }, let = { q = \"1\" } }]", "when"),
        ("exclude = [{ z = 1 }]", "exclude"),
    ] {
        let err = refuse_at(
            &format!("{HARMLESS}[rule.a]\noutputs = [\"x\"]\ncommand = \"echo > x\"\n{key}\n"),
            &format!("`z` in {what} is not a matrix variable of this rule"),
            if what == "when" {
                "Qairtfile:7:20"
            } else {
                "Qairtfile:7:14"
            },
        );
        assert!(
            err.contains(&format!(
                "= hint: this rule has no `matrix`: {what} picks among matrix values, so give it one\n"
            )),
            "{err}"
        );
    }
}

/// An unknown variable in a variable's own value suggested that variable (`num_splits =
/// "${num_split}"`: "did you mean `num_splits`?"), which would be a cycle.
#[test]
fn an_unknown_variable_is_never_answered_with_the_one_it_defines() {
    let err = refuse_at(
        "[vars]\nnum_splits = \"${num_split}\"\n[rule.ok]\noutputs = [\"ran.txt\"]\ncommand = \"echo ${num_splits} > ran.txt\"\n",
        "unknown variable `num_split`",
        "Qairtfile:2:15",
    );
    assert!(!err.contains("did you mean `num_splits`"), "{err}");
}

#[test]
fn manual_must_be_a_boolean() {
    let q = format!("{HARMLESS}\n[rule.push]\nmanual = \"yes\"\noutputs = [\"p.txt\"]\ncommand = \"echo > p.txt\"\n");
    let err = refuse_at(&q, "manual must be true or false", "Qairtfile:6:10");
    assert!(err.contains("hint: write `manual = true`"), "{err}");
}
