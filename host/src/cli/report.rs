//! How failures reach the terminal: one line on stderr, naming what failed and where.

use std::process::ExitCode;

use clap::error::ErrorKind;

/// The error and its causes on one line. Causes already quoted by their parent (store
/// errors include their source in the message) are not repeated.
pub fn one_line(err: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in err.chain() {
        let message = flatten(&cause.to_string());
        if message.is_empty() || line.contains(&message) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&message);
    }
    line
}

/// Report a command line clap could not parse. Help and version go to stdout as clap
/// renders them; mistakes become one `error:` line (with clap's tip, without the usage).
pub fn usage_error(err: clap::Error) -> ExitCode {
    let code = u8::try_from(err.exit_code()).unwrap_or(2);
    let informational = matches!(
        err.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    );
    if informational {
        // Nothing better to do when the terminal is gone.
        let _ = err.print();
        return ExitCode::from(code);
    }
    eprintln!("{}", clap_one_line(&err.render().to_string()));
    ExitCode::from(code)
}

/// clap's message is paragraphs: the error (maybe with an indented list), tips, the usage
/// and a pointer to --help. Keep the error and the tips.
fn clap_one_line(rendered: &str) -> String {
    let kept: Vec<String> = rendered
        .split("\n\n")
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .filter(|p| !p.starts_with("Usage:") && !p.starts_with("For more information"))
        .map(flatten)
        .collect();
    let line = kept.join("; ");
    if line.starts_with("error:") {
        line
    } else {
        format!("error: {line}")
    }
}

/// Join a possibly multi-line message into one line.
fn flatten(message: &str) -> String {
    message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_causes_are_dropped() {
        let io = std::io::Error::other("disk full");
        let err = anyhow::Error::new(io).context("cannot write herald.toml");
        assert_eq!(one_line(&err), "cannot write herald.toml: disk full");

        #[derive(Debug, thiserror::Error)]
        #[error("cannot open store x: {0}")]
        struct Quoting(#[source] std::io::Error);
        let err = anyhow::Error::new(Quoting(std::io::Error::other("refused")));
        assert_eq!(one_line(&err), "cannot open store x: refused");
    }

    #[test]
    fn clap_errors_lose_usage_and_keep_tips() {
        let rendered = "error: unexpected argument '--typ' found\n\n  tip: a similar argument \
                        exists: '--type'\n\nUsage: herald events append --type <TYPE>\n\nFor \
                        more information, try '--help'.\n";
        assert_eq!(
            clap_one_line(rendered),
            "error: unexpected argument '--typ' found; tip: a similar argument exists: '--type'"
        );
        let rendered = "error: the following required arguments were not provided:\n  \
                        --entity-id <ENTITY_ID>\n\nUsage: herald\n";
        assert_eq!(
            clap_one_line(rendered),
            "error: the following required arguments were not provided: --entity-id <ENTITY_ID>"
        );
    }
}
