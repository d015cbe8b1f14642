//! Printing an error with its causes, once each: `cannot set up the streams: stream EV_REQUESTS:
//! timed out`. Errors keep their cause as `source()` (so a caller can inspect it), and their own
//! message says only what failed at their level; the chain is printed once, where the error is
//! finally handled (a log line, the one line a binary prints before it exits).

use std::fmt;

/// Displays `error` followed by each of its causes, separated by `: `. A cause whose message
/// the text so far already holds is left out: some libraries' errors (async-nats's among them)
/// print their source in their own message.
pub fn chain<'a>(error: &'a (dyn std::error::Error + 'static)) -> Chain<'a> {
    Chain(error)
}

/// See [`chain`].
#[derive(Debug, Clone, Copy)]
pub struct Chain<'a>(&'a (dyn std::error::Error + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut text = self.0.to_string();
        let mut cause = self.0.source();
        while let Some(error) = cause {
            let message = error.to_string();
            if !text.contains(&message) {
                text.push_str(": ");
                text.push_str(&message);
            }
            cause = error.source();
        }
        f.write_str(&text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot read trace.csv")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn each_cause_is_printed_once() {
        let e = Outer(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "no such file",
        ));
        assert_eq!(chain(&e).to_string(), "cannot read trace.csv: no such file");
    }

    #[derive(Debug, thiserror::Error)]
    #[error("timed out: {0}")]
    struct SaysItsSource(#[source] std::io::Error);

    #[test]
    fn a_cause_already_in_the_message_is_not_repeated() {
        let e = Outer(std::io::Error::other(SaysItsSource(std::io::Error::other(
            "deadline has elapsed",
        ))));
        assert_eq!(
            chain(&e).to_string(),
            "cannot read trace.csv: timed out: deadline has elapsed"
        );
    }
}
