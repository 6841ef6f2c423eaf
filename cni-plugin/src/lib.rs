//! The library half of the `tapestry-cni-plugin` package: the chaining installer
//! (`tapestry-install-cni`), kept here so its logic is unit-tested without running the binary.
//! The plugin itself, `tapestry-cni`, is `src/main.rs`.

pub mod install;
