//! Guest output, from bytes to numbered lines.
//!
//! Owns the line rules ([`LineSplitter`]), the record shape ([`LogRecord`]), the
//! per-workload sequencing and fan-out ([`LogWriter`]) and live delivery
//! ([`LogBroker`]). It must not touch SQLite: durable lines go to a
//! [`LineSink`] (the store implements it, batching lines and publishing them
//! to a [`LivePublisher`] — the broker — once they are committed).

mod broker;
mod record;
mod sink;
mod splitter;
mod writer;

pub use broker::{BrokerEvent, LogBroker, LogPublisher, LogSubscription, TryNext};
pub use record::{Fields, LogLevel, LogRecord, LogStream};
pub use sink::{LineSink, LivePublisher, SinkPair};
pub use splitter::{LineSplitter, MAX_LINE_BYTES};
pub use writer::{LinesNotStored, LogWriter, OutputLimitExceeded};
