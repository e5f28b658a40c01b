//! SOCKS5 listener (`socks5.md`): greeting and authentication through fast-socks5's server
//! protocol API, then our policy pipeline between reading the command and replying.

pub use portcullis_dataplane::socks5_auth as auth;
mod tcp;
mod udp;
use portcullis_dataplane::socks5_wire as wire;

pub use tcp::serve_connection;
