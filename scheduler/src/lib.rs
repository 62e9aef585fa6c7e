//! The nixdispatch scheduler.
