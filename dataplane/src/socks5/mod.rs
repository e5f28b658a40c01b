//! SOCKS5 listener (`socks5.md`): greeting and authentication through fast-socks5's server
//! protocol API, then our policy pipeline between reading the command and replying.

pub mod auth;
mod tcp;
mod udp;

pub use tcp::serve_connection;
