//! Answers every HTTP request with `hello`: the `wasi:http/proxy` component
//! that `wasmtime serve` runs as the baseline of the `server_load`
//! benchmark (the same work as the `hello` workload: print one line).
use wasip2::exports::http::incoming_handler::Guest;
use wasip2::http::types::{
    Fields, IncomingRequest, OutgoingBody, OutgoingResponse, ResponseOutparam,
};

struct Hello;

impl Guest for Hello {
    fn handle(_request: IncomingRequest, out: ResponseOutparam) {
        let response = OutgoingResponse::new(Fields::new());
        let body = response.body().expect("a new response has a body");
        ResponseOutparam::set(out, Ok(response));
        let stream = body.write().expect("a new body has a stream");
        stream
            .blocking_write_and_flush(b"hello\n")
            .expect("the client reads the body");
        drop(stream);
        OutgoingBody::finish(body, None).expect("the body ends");
    }
}

wasip2::http::proxy::export!(Hello with_types_in wasip2);
