//! The demo's gRPC service (`proto/counter.proto`): the same per-session counters as `/incr`,
//! served on the same port over h2c, so gRPC calls and streams can show whether their session
//! kept reaching one pod.

use std::pin::Pin;

use futures_util::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use super::Shared;

use demo_service::pb::counter_server::{Counter, CounterServer};
use demo_service::pb::{Count, IncrRequest};

pub struct Grpc(Shared);

impl Grpc {
    pub fn server(demo: Shared) -> CounterServer<Grpc> {
        CounterServer::new(Grpc(demo))
    }

    fn count(&self, session: String) -> Result<Count, Status> {
        if session.is_empty() {
            return Err(Status::invalid_argument("session is empty"));
        }
        let count = super::bump(&self.0, &session);
        let name = |h: &http::HeaderValue| String::from_utf8_lossy(h.as_bytes()).into_owned();
        Ok(Count { session, count, pod: name(&self.0.pod), revision: name(&self.0.revision) })
    }
}

#[tonic::async_trait]
impl Counter for Grpc {
    async fn incr(&self, req: Request<IncrRequest>) -> Result<Response<Count>, Status> {
        self.count(req.into_inner().session).map(Response::new)
    }

    type StreamStream = Pin<Box<dyn Stream<Item = Result<Count, Status>> + Send>>;

    async fn stream(&self, req: Request<Streaming<IncrRequest>>) -> Result<Response<Self::StreamStream>, Status> {
        let demo = Grpc(self.0.clone());
        let counts = req.into_inner().map(move |msg| msg.and_then(|m| demo.count(m.session)));
        Ok(Response::new(Box::pin(counts)))
    }
}
