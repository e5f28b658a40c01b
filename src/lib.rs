//! Portcullis shared library: configuration, policy engine, the one `Decision`, proto types.

pub mod config;
pub mod decision;
pub mod endpoint;
pub mod policy;
pub mod proto;
pub mod secret;
pub mod signals;
pub mod telemetry;
