//! QMP protocol core, transport independent: greeting, `\r\n` framing, a streaming JSON decoder,
//! capabilities negotiation, QEMU error classes, events, and the [`Dispatcher`] the machine
//! implements for its own commands. [`server`] serves it on Unix sockets with SCM_RIGHTS.
//!
//! Behaviour follows QEMU 7.2 (`monitor/qmp.c`, `qapi/qmp-dispatch.c`) as libxl 4.17 relies on
//! it: replies are compact JSON objects each followed by `\r\n`; input objects need no separator;
//! `id` is echoed as given (any JSON value); `CommandNotFound` drives libxl's fallbacks.

mod args;
pub mod commands;
mod decoder;
mod fdstore;
pub mod server;
mod session;

pub use args::Args;
pub use commands::{DmControl, RunState, XenQmp};
pub use fdstore::{FdStore, MAX_STORED_FDS};
pub use session::{Session, BUILTIN_COMMANDS, MAX_MESSAGE, OUTPUT_HIGH_WATER};

use serde_json::{Map, Value};
use std::time::{SystemTime, UNIX_EPOCH};

/// QEMU's `QapiErrorClass` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    GenericError,
    CommandNotFound,
    DeviceNotActive,
    DeviceNotFound,
    KVMMissingCap,
}

impl ErrorClass {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::GenericError => "GenericError",
            Self::CommandNotFound => "CommandNotFound",
            Self::DeviceNotActive => "DeviceNotActive",
            Self::DeviceNotFound => "DeviceNotFound",
            Self::KVMMissingCap => "KVMMissingCap",
        }
    }
}

impl std::fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error reply: `{"error":{"class":...,"desc":...}}`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{class}: {desc}")]
pub struct QmpError {
    pub class: ErrorClass,
    pub desc: String,
}

impl QmpError {
    pub fn new(class: ErrorClass, desc: impl Into<String>) -> Self {
        Self { class, desc: desc.into() }
    }
    pub fn generic(desc: impl Into<String>) -> Self {
        Self::new(ErrorClass::GenericError, desc)
    }
    /// QEMU's text for an unknown command.
    pub fn command_not_found(cmd: &str) -> Self {
        Self::new(ErrorClass::CommandNotFound, format!("The command {cmd} has not been found"))
    }
    /// QEMU's `DeviceNotFound` for a missing device id.
    pub fn device_not_found(id: &str) -> Self {
        Self::new(ErrorClass::DeviceNotFound, format!("Device '{id}' not found"))
    }
    pub fn missing_parameter(name: &str) -> Self {
        Self::generic(format!("Parameter '{name}' is missing"))
    }
    /// `expected` is QEMU's type word: `boolean`, `integer`, `number`, `string`, `object`, `array`.
    pub fn invalid_parameter_type(name: &str, expected: &str) -> Self {
        Self::generic(format!("Invalid parameter type for '{name}', expected: {expected}"))
    }
    pub fn invalid_parameter_value(name: &str, expects: &str) -> Self {
        Self::generic(format!("Parameter '{name}' expects {expects}"))
    }
    pub fn unexpected_parameter(name: &str) -> Self {
        Self::generic(format!("Parameter '{name}' is unexpected"))
    }
}

/// The version the greeting and `query-version` report. libxl compares it with 2.8/2.11 to pick
/// command forms; anything from 7.2 on gets the modern ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    pub major: u32,
    pub minor: u32,
    pub micro: u32,
    pub package: String,
}

impl Default for Version {
    fn default() -> Self {
        Self { major: 7, minor: 2, micro: 0, package: format!("hvmdm {}", env!("CARGO_PKG_VERSION")) }
    }
}

impl Version {
    /// `{"qemu":{"micro":..,"minor":..,"major":..},"package":..}` (QEMU's member order).
    pub fn to_json(&self) -> String {
        format!(
            "{{\"qemu\":{{\"micro\":{},\"minor\":{},\"major\":{}}},\"package\":{}}}",
            self.micro,
            self.minor,
            self.major,
            Value::String(self.package.clone())
        )
    }

    pub fn to_value(&self) -> Value {
        // The string above is built from integers and a serde-escaped string: always valid JSON.
        serde_json::from_str(&self.to_json()).unwrap_or(Value::Null)
    }

    /// The greeting line sent on every new connection. No capabilities are offered: hvmdm has no
    /// out-of-band execution, and libxl never asks for it.
    pub fn greeting(&self) -> Vec<u8> {
        format!("{{\"QMP\":{{\"version\":{},\"capabilities\":[]}}}}\r\n", self.to_json()).into_bytes()
    }
}

/// An asynchronous event. libxl ignores events; other clients (tests, xentop) may not.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub name: String,
    pub data: Option<Value>,
    pub timestamp: SystemTime,
}

impl Event {
    pub fn new(name: impl Into<String>, data: Option<Value>) -> Self {
        Self { name: name.into(), data, timestamp: SystemTime::now() }
    }

    /// `{"timestamp":{"seconds":S,"microseconds":U},"event":"NAME"[,"data":{...}]}\r\n`.
    pub fn encode(&self) -> Vec<u8> {
        let d = self.timestamp.duration_since(UNIX_EPOCH).unwrap_or_default();
        let mut s = format!(
            "{{\"timestamp\":{{\"seconds\":{},\"microseconds\":{}}},\"event\":{}",
            d.as_secs(),
            d.subsec_micros(),
            Value::String(self.name.clone())
        );
        if let Some(data) = &self.data {
            s.push_str(",\"data\":");
            s.push_str(&data.to_string());
        }
        s.push_str("}\r\n");
        s.into_bytes()
    }
}

/// What the machine implements. Commands in [`BUILTIN_COMMANDS`] are answered by the session
/// itself; any other name not in [`Dispatcher::commands`] gets `CommandNotFound`.
pub trait Dispatcher {
    /// Machine-specific command names (for dispatch and `query-commands`).
    fn commands(&self) -> &[&str];

    /// Runs one command. `args` is the (possibly empty) `arguments` object; use [`Args`] to read
    /// it with QEMU's error texts. Return `Value::Object` empty for "no return value".
    fn execute(&mut self, cmd: &str, args: &Map<String, Value>) -> Result<Value, QmpError>;

    /// File descriptors received by `add-fd`/`getfd`, global to the process as in QEMU.
    fn fds(&mut self) -> &mut FdStore;
}
