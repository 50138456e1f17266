//! Nothing to use: this package holds the crate's criterion benches
//! (`benches/*.rs`, see `benches/README.md`). A library target is here
//! only because a package needs one target that is not a bench.
