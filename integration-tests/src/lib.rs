//! Test support for black-box tests of the real Portcullis binaries: process spawning, a test
//! DNS server, loopback origins, and curl / raw-socket clients.

pub mod curl;
pub mod proxy;
pub mod raw;

pub use curl::{CurlResult, curl};
pub use proxy::{ProxyProcess, run_to_exit};
pub use raw::{RawResponse, raw_request};
