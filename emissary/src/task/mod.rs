//! The task contract over `process` and `transfer`: where the spec comes from ([`template`]),
//! containerSet ordering ([`deps`]), input staging ([`inputs`]), one attempt from spec to
//! report ([`step`]), output collection ([`outputs`]), and the init container ([`init`]).

pub mod deps;
pub mod init;
pub mod inputs;
pub mod outputs;
pub mod step;
pub mod template;
