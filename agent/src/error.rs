//! Errors as the log shows them.

/// An error and those of its causes that its message does not already tell, on one line, for
/// the log. Some errors repeat their cause in their own message (kube's); others keep it to
/// themselves (hyper's "client error (Connect)" is caused by "tcp connect error", caused by
/// "Connection refused").
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(error) = cause {
        let more = error.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        cause = error.source();
    }
    text
}
