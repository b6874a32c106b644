//! The structured-output flags of `generate` and `bench` (`--json-schema FILE`, `--json`,
//! `--grammar FILE.lark`, `--regex RE`), and the usage error (exit code 2) for a constraint
//! that cannot be used.

use std::path::PathBuf;

use clap::Args;
use performer::constraint::Constraint;

/// The most bytes a schema or grammar file may have.
const MAX_CONSTRAINT_BYTES: u64 = 16 << 20;

/// What the output must match (at most one of the flags).
#[derive(Args, Debug, Default, Clone)]
#[group(multiple = false)]
pub struct ConstraintArgs {
    /// Output JSON valid against this JSON schema file (llguidance's subset; an unsupported
    /// keyword is refused by name). Compact JSON; generation ends when the value is complete.
    #[arg(long, value_name = "FILE")]
    pub json_schema: Option<PathBuf>,
    /// Output a JSON object.
    #[arg(long)]
    pub json: bool,
    /// Output text matching this Lark grammar file (llguidance's dialect; rule `start`).
    #[arg(long, value_name = "FILE.lark")]
    pub grammar: Option<PathBuf>,
    /// Output text matching this regular expression (Rust regex syntax), as a whole.
    #[arg(long, value_name = "RE")]
    pub regex: Option<String>,
}

/// A bad constraint: `main` prints it on one line and exits with code 2 (a usage error).
#[derive(Debug)]
pub struct UsageError(pub String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

fn read(path: &PathBuf, what: &str) -> Result<String, UsageError> {
    let bytes = performer::fsutil::read_regular_file(path, MAX_CONSTRAINT_BYTES)
        .map_err(|e| UsageError(format!("{what}: {e}")))?;
    String::from_utf8(bytes)
        .map_err(|e| UsageError(format!("{what} {}: not UTF-8: {e}", path.display())))
}

impl ConstraintArgs {
    /// The constraint the flags ask for (none without flags). An unreadable file or a schema
    /// that is not JSON is a [`UsageError`].
    pub fn constraint(&self) -> Result<Option<Constraint>, UsageError> {
        if let Some(p) = &self.json_schema {
            let text = read(p, "--json-schema")?;
            let schema = serde_json::from_str(&text)
                .map_err(|e| UsageError(format!("--json-schema {}: not JSON: {e}", p.display())))?;
            return Ok(Some(Constraint::JsonSchema(schema)));
        }
        if self.json {
            return Ok(Some(Constraint::Json));
        }
        if let Some(p) = &self.grammar {
            return Ok(Some(Constraint::Lark(read(p, "--grammar")?)));
        }
        Ok(self.regex.clone().map(Constraint::Regex))
    }
}

/// Turns an invalid constraint (caught before any token) into a [`UsageError`]; other
/// errors stay as they are.
pub fn usage_if_invalid(e: performer::Error) -> Box<dyn std::error::Error> {
    match e {
        performer::Error::InvalidConstraint { .. } => Box::new(UsageError(e.to_string())),
        e => Box::new(e),
    }
}
