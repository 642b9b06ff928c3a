//! The level of the activator's own log lines: `RUST_LOG` (default `info`) at start, and in
//! Knative mode `config-logging`'s `loglevel.activator` live, read as upstream's zap reads it.
//! Owns the filter of log output only; our spans never reach it.

use tracing_subscriber::EnvFilter;
use tracing_subscriber::Registry;
use tracing_subscriber::reload;

use super::SPAN_TARGET;

/// What decides which log lines are written; `LogLevel` changes it while the process runs.
pub(crate) type LogFilter = reload::Layer<EnvFilter, Registry>;

/// Changes the log filter while the process runs.
#[derive(Clone)]
pub(crate) struct LogLevel {
    handle: reload::Handle<EnvFilter, Registry>,
}

impl std::fmt::Debug for LogLevel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LogLevel")
    }
}

impl LogLevel {
    /// The filter for log output, `RUST_LOG` or `info`, and the handle that changes it.
    pub(crate) fn start() -> (LogFilter, LogLevel) {
        let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
        let (layer, handle) = reload::Layer::new(without_spans(filter));
        (layer, LogLevel { handle })
    }

    /// Logs at `level` (a `tracing` level name) from now on.
    pub(crate) fn set(&self, level: tracing::Level) {
        let filter = without_spans(EnvFilter::new(level.as_str().to_ascii_lowercase()));
        if let Err(e) = self.handle.reload(filter) {
            tracing::warn!(error = %e, "the log level could not be changed");
        }
    }
}

fn without_spans(filter: EnvFilter) -> EnvFilter {
    filter.add_directive(format!("{SPAN_TARGET}=off").parse().expect("a static directive"))
}

/// The level `config-logging` asks of the `activator` component, as upstream's
/// `knative.dev/pkg/logging` reads it: `loglevel.activator`, else the `level` of
/// `zap-logger-config`, else info. A level zap does not know fails the whole ConfigMap, as
/// upstream's `NewConfigFromMap` does for any `loglevel.*` key.
pub(crate) fn level_from_config_logging(
    data: &std::collections::BTreeMap<String, String>,
    component: &str,
) -> Result<tracing::Level, String> {
    let mut own = None;
    for (key, value) in data {
        let Some(name) = key.strip_prefix("loglevel.").filter(|c| !c.is_empty()) else { continue };
        if value.is_empty() {
            continue;
        }
        let level = zap_level(value).ok_or_else(|| format!("{key}: invalid logging level: {value}"))?;
        if name == component {
            own = Some(level);
        }
    }
    if let Some(level) = own {
        return Ok(level);
    }
    let zap_config =
        data.get("zap-logger-config").and_then(|json| serde_json::from_str::<serde_json::Value>(json).ok());
    let configured = zap_config.as_ref().and_then(|c| c.get("level")?.as_str().map(str::to_owned));
    Ok(configured.as_deref().and_then(zap_level).unwrap_or(tracing::Level::INFO))
}

/// zap's level names (`zapcore.Level.UnmarshalText`), case-insensitive; zap's levels above error
/// are errors here, the process never panics or exits for a log line.
fn zap_level(text: &str) -> Option<tracing::Level> {
    match text.to_ascii_lowercase().as_str() {
        "debug" => Some(tracing::Level::DEBUG),
        "info" | "" => Some(tracing::Level::INFO),
        "warn" | "warning" => Some(tracing::Level::WARN),
        "error" | "dpanic" | "panic" | "fatal" => Some(tracing::Level::ERROR),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing::Level;

    fn map(pairs: &[(&str, &str)]) -> std::collections::BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    /// Upstream's `NewConfigFromMap` and `UpdateLevelFromConfigMap` (vendored
    /// `knative.dev/pkg/logging/config.go`).
    #[test]
    fn config_logging_is_read_as_upstreams_zap_reads_it() {
        let level = |pairs: &[(&str, &str)]| level_from_config_logging(&map(pairs), "activator");
        assert_eq!(level(&[]), Ok(Level::INFO));
        assert_eq!(level(&[("loglevel.activator", "DEBUG"), ("loglevel.controller", "error")]), Ok(Level::DEBUG));
        assert_eq!(level(&[("loglevel.activator", "warning")]), Ok(Level::WARN));
        assert_eq!(level(&[("loglevel.activator", "fatal")]), Ok(Level::ERROR));
        assert_eq!(level(&[("loglevel.activator", "")]), Ok(Level::INFO), "an empty level is skipped");
        assert_eq!(level(&[("zap-logger-config", r#"{"level": "warn", "encoding": "json"}"#)]), Ok(Level::WARN));
        assert!(level(&[("loglevel.activator", "loud")]).is_err());
        assert!(level(&[("loglevel.webhook", "loud")]).is_err(), "any component's bad level fails the map");
    }
}
