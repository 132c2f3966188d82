//! Logging set-up: text or JSON lines on stderr, level from `RUST_LOG`
//! (default `info`), changeable at run time through the admin API
//! (`/logging?level=debug`). Colour only on a terminal.

use std::{io::IsTerminal as _, sync::OnceLock};

use tracing_subscriber::{
    fmt, layer::SubscriberExt as _, reload, util::SubscriberInitExt as _, EnvFilter, Registry,
};

use crate::config::LogFormat;

static FILTER: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();

/// Installs the global subscriber (once; later calls are ignored).
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let ansi = std::io::stderr().is_terminal();
    let ok = match format {
        LogFormat::Json => tracing_subscriber::registry()
            .with(filter)
            .with(fmt::layer().json().flatten_event(true).with_writer(std::io::stderr))
            .try_init(),
        LogFormat::Text => tracing_subscriber::registry()
            .with(filter)
            .with(fmt::layer().with_ansi(ansi).with_writer(std::io::stderr))
            .try_init(),
    };
    if ok.is_ok() {
        let _ = FILTER.set(handle);
    }
}

/// Changes the log filter (e.g. `debug`, `info,tlsmesh=trace`).
pub fn set_level(spec: &str) -> Result<(), String> {
    let filter = EnvFilter::try_new(spec).map_err(|e| format!("bad log level {spec:?}: {e}"))?;
    let handle = FILTER.get().ok_or("logging is not initialised")?;
    handle.reload(filter).map_err(|e| e.to_string())
}
