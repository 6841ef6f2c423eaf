//! Tapestry's local API and desired-state model.
