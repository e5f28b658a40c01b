//! The policy engine: host normalisation, the pattern language, the compiled index, the
//! non-public address table, and the decision order (`policy.md`).

pub mod address;
pub mod engine;
pub mod index;
pub mod normalize;
pub mod pattern;

#[cfg(test)]
mod tests;

pub use address::{AddressClass, classify};
pub use engine::{
    AddressPlan, AskMode, CompiledPolicy, NameStage, PolicySpec, Proceed, Refusal, RequestContext,
};
pub use index::PatternIndex;
pub use normalize::{Host, HostError, canonical_ip, normalize_host, split_authority};
pub use pattern::{HostPattern, ListKind, Pattern, PatternError, parse_pattern};
