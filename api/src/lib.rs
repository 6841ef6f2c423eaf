//! Tapestry's local API: the desired-state model (the standalone state file), the API's request
//! and response types, and a client.
pub mod client;
mod keyword;
pub mod state;
pub mod types;
