//! The nixdispatch builder agent.
