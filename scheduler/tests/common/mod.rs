//! What the scheduler's integration tests that need a registered builder share: a builder's
//! registration and an agent stream that keeps it registered.
//!
//! Each test binary uses part of it.
#![allow(dead_code)]

use nixdispatch::proto::{
    self, AgentMessage, Register, agent_message::Message, agent_service_client::AgentServiceClient,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

/// A real ed25519 host key line.
pub(crate) const KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHdzrOYYsx97jgJC4raQrLvbWQfJI3Wj8wIeg0F7/qlv";

/// The registration of builder `id` at `store_uri`, pinning `key`, building x86_64-linux
/// on `slots` slots.
pub(crate) fn register(id: &str, store_uri: &str, key: &str, slots: u32) -> Register {
    Register {
        host_id: id.into(),
        store_uri: store_uri.into(),
        host_public_key: key.trim().into(),
        systems: vec!["x86_64-linux".into()],
        max_jobs: slots,
        cpu_count: 8,
        agent_version: "test".into(),
        ..Default::default()
    }
}

/// An agent stream; the host stays registered while it lives.
pub(crate) struct Agent {
    _tx: mpsc::Sender<AgentMessage>,
    _rx: tonic::Streaming<proto::SchedulerMessage>,
}

/// Registers `r` over `channel` and waits for the scheduler's first directive: from then on
/// the host is known.
pub(crate) async fn agent(channel: Channel, r: Register) -> Agent {
    let (tx, out) = mpsc::channel(8);
    tx.send(AgentMessage {
        message: Some(Message::Register(r)),
    })
    .await
    .unwrap();
    let mut rx = AgentServiceClient::new(channel)
        .session(ReceiverStream::new(out))
        .await
        .unwrap()
        .into_inner();
    rx.message().await.unwrap().unwrap();
    Agent { _tx: tx, _rx: rx }
}

/// A channel to the scheduler at `addr`.
pub(crate) async fn channel(addr: &str) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}
