//! Black-box scenarios for emissary and emissary-agent live in `main.rs` and its modules; this
//! library is empty so the package has a target of its own.
