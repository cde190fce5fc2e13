//! `probe-bypass rewrite`, run as a user would: the real binary, its input on stdin.

use std::{
    io::Write as _,
    process::{Command, Output, Stdio},
};

/// Runs `probe-bypass rewrite` with `args` and `stdin` on its standard input, to its end.
pub fn run_rewrite(args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(crate::agent_bin())
        .arg("rewrite")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the agent binary starts");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin)
        .expect("written");
    child.wait_with_output().expect("it finishes")
}
