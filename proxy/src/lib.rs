//! canary-proxy library (being written)
#![forbid(unsafe_code)]
