//! Benchmarks of nixdispatch (see issue: placement simulator and load generator).
