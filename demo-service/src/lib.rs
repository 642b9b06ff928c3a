//! The gRPC messages, server and client of demo-service's counter (`proto/counter.proto`), for
//! the binary that serves it and for the tests that call it.

pub mod pb {
    tonic::include_proto!("demo.v1");
}
