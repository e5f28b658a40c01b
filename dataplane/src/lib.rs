//! The pure request parsing of the data plane, as a library: the HTTP request-target rules,
//! the SOCKS5 destination and UDP datagram header, and the SOCKS5 username/password method.
//! The `portcullis-proxy` binary uses these modules; the fuzz targets (`fuzz/`) drive them.

#[path = "http/target.rs"]
pub mod http_target;
#[path = "socks5/auth.rs"]
pub mod socks5_auth;
#[path = "socks5/wire.rs"]
pub mod socks5_wire;
