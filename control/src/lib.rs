//! The pure parts of the control plane that other crates (the fuzz targets) use: the
//! `network_rule` file format. Everything else lives in the `portcullis-control` binary.

pub mod rules;
