//! Reading a config file: YAML into the raw shape (every unknown key noted on the way), then
//! validation. All problems of a file are reported together, each with its line.

use std::path::Path;

use super::error::{ConfigError, ConfigErrors, Problem};
use super::model::Config;
use super::raw::RawConfig;
use super::validate::Validator;
use super::{lines, unknown};

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors(vec![ConfigError {
                file: file.clone(),
                line: None,
                key: String::new(),
                problem: Problem::Unreadable(e.to_string()),
            }])
        })?;
        let mut config = Config::from_yaml(&text, &file)?;
        config.source = Some(path.to_path_buf());
        Ok(config)
    }

    /// Parses and validates YAML text; `file` only labels the errors. Unknown keys are
    /// reported together with every problem the validator finds, not instead of them.
    pub fn from_yaml(text: &str, file: &str) -> Result<Config, ConfigErrors> {
        let lines = lines::key_lines(text);
        let locate = |mut errors: Vec<ConfigError>| {
            for e in &mut errors {
                e.line = e.line.or_else(|| lines::line_of(&lines, &e.key));
            }
            errors
        };
        let mut unknown_keys = Vec::new();
        let mut track = serde_path_to_error::Track::new();
        let de = serde_yaml_ng::Deserializer::from_str(text);
        let de = serde_path_to_error::Deserializer::new(de, &mut track);
        let parsed: Result<RawConfig, _> =
            serde_ignored::deserialize(de, |path| unknown_keys.push(unknown::key_path(&path)));
        let unknown: Vec<ConfigError> =
            unknown_keys.iter().map(|k| unknown::error(file, k)).collect();
        let raw = match parsed {
            Ok(raw) => raw,
            Err(inner) => {
                let key = track.path().to_string();
                let line = inner.location().map(|l| l.line());
                // The parser's message repeats the location; keep only its words.
                let msg = inner.to_string();
                let msg = match msg.find(" at line ") {
                    Some(i) => msg[..i].to_string(),
                    None => msg,
                };
                // ... and may start with the key path, which the error names already.
                let msg = msg.strip_prefix(&format!("{key}: ")).map(str::to_string).unwrap_or(msg);
                let mut errors = unknown;
                errors.push(ConfigError {
                    file: file.to_string(),
                    line,
                    key: if key == "." { String::new() } else { key },
                    problem: Problem::Syntax(msg),
                });
                return Err(ConfigErrors(locate(errors)));
            }
        };
        match Validator::new(file).config(raw) {
            Ok(mut config) if unknown.is_empty() => {
                config.warnings = locate(std::mem::take(&mut config.warnings));
                Ok(config)
            }
            Ok(_) => Err(ConfigErrors(locate(unknown))),
            Err(ConfigErrors(errors)) => {
                let mut all = unknown;
                all.extend(errors);
                Err(ConfigErrors(locate(all)))
            }
        }
    }
}
