//! Renderers of a [`Decision`](super::Decision): canonical JSON, prefix line, bodies, log line.
