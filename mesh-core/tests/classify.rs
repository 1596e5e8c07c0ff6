//! Outcome classification of responses, trailers and real errors.

use std::io;

use http::{HeaderMap, HeaderValue, StatusCode};
use mesh_core::ResponseFlags;
use mesh_core::classify::{ConnectError, Failure, GrpcCode, Outcome, TimeoutError};

fn grpc(code: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("grpc-status", HeaderValue::from_str(code).unwrap());
    h
}

#[test]
fn statuses() {
    let empty = HeaderMap::new();
    let ok = Outcome::from_response(StatusCode::OK, &empty);
    assert!(ok.is_success() && !ok.is_server_error() && !ok.is_gateway_error());
    let not_found = Outcome::from_response(StatusCode::NOT_FOUND, &empty);
    assert!(not_found.is_success(), "a 4xx is an answer, not a failure of the upstream");
    let e500 = Outcome::from_response(StatusCode::INTERNAL_SERVER_ERROR, &empty);
    assert!(e500.is_server_error() && !e500.is_gateway_error() && !e500.is_success());
    for s in [502, 503, 504] {
        let o = Outcome::from_response(StatusCode::from_u16(s).unwrap(), &empty);
        assert!(o.is_gateway_error() && o.is_server_error(), "{s}");
    }
    assert!(!Outcome::from_response(StatusCode::from_u16(505).unwrap(), &empty).is_gateway_error());
    assert_eq!(ok.response_flags(), ResponseFlags::empty());
}

#[test]
fn grpc_status_from_head_and_trailers() {
    let head = Outcome::from_response(StatusCode::OK, &grpc("14"));
    assert_eq!(head.grpc_status(), Some(GrpcCode::UNAVAILABLE));
    assert!(!head.is_success());
    // A status in the head is final; trailers do not override it.
    assert_eq!(head.with_trailers(&grpc("0")).grpc_status(), Some(GrpcCode::UNAVAILABLE));

    let pending = Outcome::from_response(StatusCode::OK, &HeaderMap::new());
    assert!(pending.is_success());
    let done = pending.with_trailers(&grpc("4"));
    assert_eq!(done.grpc_status(), Some(GrpcCode::DEADLINE_EXCEEDED));
    assert!(!done.is_success());
    assert!(pending.with_trailers(&grpc("0")).is_success());
    // A present status that is not a number is Envoy's InvalidCode, in the head or the
    // trailers: a failure, 500 for outlier detection, no retry condition's code. Empty is
    // absent.
    for garbage in ["1x", "-1", "1 4", "+", "99999999999", "\u{e9}"] {
        let bad = pending.with_trailers(&grpc(garbage));
        assert_eq!(bad.grpc_status(), Some(GrpcCode::INVALID), "{garbage:?}");
        assert!(!bad.is_success());
    }
    let bad_head = Outcome::from_response(StatusCode::OK, &grpc("unavailable"));
    assert_eq!(bad_head.head_grpc_status(), Some(GrpcCode::INVALID));
    assert_ne!(bad_head.head_grpc_status(), Some(GrpcCode::UNAVAILABLE));
    assert_eq!(bad_head.outlier_status(true), Some(StatusCode::INTERNAL_SERVER_ERROR));
    assert_eq!(pending.with_trailers(&grpc("")).grpc_status(), None);
    // Envoy's number parsing: whitespace around it and a `+` are fine.
    for lenient in [" 14", "14\t", "+14", "014"] {
        assert_eq!(pending.with_trailers(&grpc(lenient)).grpc_status(), Some(GrpcCode::UNAVAILABLE), "{lenient:?}");
    }
    assert_eq!(
        (GrpcCode::INVALID.to_string(), format!("{:?}", GrpcCode::INVALID)),
        ("-1".into(), "INVALID(-1)".into())
    );
    assert_eq!(GrpcCode::new(u32::MAX), GrpcCode::INVALID);
    assert_eq!(GrpcCode::new(99).name(), None);
    assert_eq!(format!("{:?}", GrpcCode::UNAVAILABLE), "UNAVAILABLE(14)");
}

/// Retries and outlier detection see only a head `grpc-status` (SEMANTICS 1.13.2 and 2.4.2);
/// telemetry sees either.
#[test]
fn where_the_grpc_status_arrived_matters() {
    let trailers_only = Outcome::from_response(StatusCode::OK, &grpc("14"));
    assert_eq!(trailers_only.head_grpc_status(), Some(GrpcCode::UNAVAILABLE));
    assert_eq!(trailers_only.outlier_status(true), Some(StatusCode::SERVICE_UNAVAILABLE));
    assert_eq!(trailers_only.outlier_status(false), Some(StatusCode::OK), "only gRPC requests are mapped");
    assert!(!trailers_only.is_server_error(), "5xx is the HTTP status only");

    let in_trailers = Outcome::from_response(StatusCode::OK, &HeaderMap::new()).with_trailers(&grpc("14"));
    assert_eq!(in_trailers.grpc_status(), Some(GrpcCode::UNAVAILABLE));
    assert_eq!(in_trailers.head_grpc_status(), None);
    assert_eq!(in_trailers.outlier_status(true), Some(StatusCode::OK), "a trailer status is not seen");

    // Envoy's grpcToHttpStatus for every standard code, and a non-standard one.
    let table = [
        (0, 200),
        (1, 499),
        (2, 500),
        (3, 400),
        (4, 504),
        (5, 404),
        (6, 409),
        (7, 403),
        (8, 429),
        (9, 400),
        (10, 409),
        (11, 400),
        (12, 501),
        (13, 500),
        (14, 503),
        (15, 500),
        (16, 401),
        (17, 500),
    ];
    for (code, http) in table {
        assert_eq!(GrpcCode::new(code).to_http_status().as_u16(), http, "grpc {code}");
    }

    // Local-origin failures, as Envoy counts them with local-origin errors not split out:
    // every upstream reset is a connect failure to it, a timeout is 504.
    let failure = |f| Outcome::Failure(f).outlier_status(false).map(|s| s.as_u16());
    assert_eq!(failure(Failure::ConnectFailure), Some(503));
    assert_eq!(failure(Failure::StreamReset), Some(503));
    assert_eq!(failure(Failure::RefusedStream), Some(503));
    assert_eq!(failure(Failure::ConnectionTerminated), Some(503));
    assert_eq!(failure(Failure::ProtocolError), Some(503));
    assert_eq!(failure(Failure::Timeout), Some(504));
    assert_eq!(failure(Failure::Other), None, "a local failure is not the upstream's");
    let bad_gateway = Outcome::from_response(StatusCode::BAD_GATEWAY, &HeaderMap::new());
    assert_eq!(bad_gateway.outlier_status(true), Some(StatusCode::BAD_GATEWAY));
}

#[test]
fn real_connect_failure() {
    // Bind, learn a free port, close it: connecting there is refused by the kernel.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let err = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap_err();
    assert_eq!(Outcome::from_error(&err).failure(), Some(Failure::ConnectFailure));
    let wrapped = ConnectError::new(io::Error::new(io::ErrorKind::TimedOut, "connect timed out"));
    let o = Outcome::from_error(&wrapped);
    assert!(o.is_connect_failure(), "a connect timeout is a connect failure (UF), not UT");
    assert_eq!(o.response_flags().to_string(), "UF");
}

#[test]
fn resets_and_timeouts() {
    let reset = io::Error::from(io::ErrorKind::ConnectionReset);
    let o = Outcome::from_error(&reset);
    assert!(o.is_reset() && !o.is_refused_stream());
    assert_eq!(o.response_flags().to_string(), "UC");

    let refused: h2::Error = h2::Reason::REFUSED_STREAM.into();
    let o = Outcome::from_error(&refused);
    assert!(o.is_refused_stream() && o.is_reset());
    assert_eq!(o.response_flags().to_string(), "UR");

    let cancelled: h2::Error = h2::Reason::CANCEL.into();
    assert_eq!(Outcome::from_error(&cancelled).failure(), Some(Failure::StreamReset));

    // (h2 carries a connection's io::Error inside it, not as a source; h2 offers no way to
    // build one here, so mesh-proxy's end-to-end tests cover that case with a real socket.)

    // A protocol violation h2 caught itself is a protocol error, not a reset by the peer.
    let violation: h2::Error = h2::Reason::FRAME_SIZE_ERROR.into();
    assert_eq!(Outcome::from_error(&violation).failure(), Some(Failure::ProtocolError));
    assert_eq!(Outcome::from_error(&violation).response_flags().to_string(), "UPE");

    let t = Outcome::from_error(&TimeoutError::new());
    assert!(t.is_timeout());
    assert_eq!(t.response_flags().to_string(), "UT");

    let other = io::Error::other("something else");
    assert_eq!(Outcome::from_error(&other).failure(), Some(Failure::Other));
}

#[test]
fn source_chain_is_walked() {
    #[derive(Debug)]
    struct Outer(io::Error);
    impl std::fmt::Display for Outer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("request failed")
        }
    }
    impl std::error::Error for Outer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }
    let e = Outer(io::Error::from(io::ErrorKind::BrokenPipe));
    assert_eq!(Outcome::from_error(&e).failure(), Some(Failure::ConnectionTerminated));
}

/// Several flags print in the order of Envoy's flag enum, whatever order they were recorded
/// in: a retried request ends as `UF,URX` (Appendix A vector 8), `UT,URX`, `UC,URX` or
/// `UR,URX`, the `response_flags` label Istio's metrics carry.
#[test]
fn flags_print_in_envoy_order() {
    for (first, second, printed) in [
        (ResponseFlags::UPSTREAM_RETRY_LIMIT_EXCEEDED, ResponseFlags::UPSTREAM_CONNECTION_FAILURE, "UF,URX"),
        (ResponseFlags::UPSTREAM_RETRY_LIMIT_EXCEEDED, ResponseFlags::UPSTREAM_REQUEST_TIMEOUT, "UT,URX"),
        (ResponseFlags::UPSTREAM_RETRY_LIMIT_EXCEEDED, ResponseFlags::UPSTREAM_CONNECTION_TERMINATION, "UC,URX"),
        (ResponseFlags::UPSTREAM_RETRY_LIMIT_EXCEEDED, ResponseFlags::UPSTREAM_REMOTE_RESET, "UR,URX"),
        (ResponseFlags::DELAY_INJECTED, ResponseFlags::FAULT_INJECTED, "DI,FI"),
        (ResponseFlags::UPSTREAM_PROTOCOL_ERROR, ResponseFlags::DOWNSTREAM_PROTOCOL_ERROR, "DPE,UPE"),
        (ResponseFlags::NO_HEALTHY_UPSTREAM, ResponseFlags::FAILED_LOCAL_HEALTH_CHECK, "LH,UH"),
    ] {
        let mut response = http::Response::new(());
        ResponseFlags::record(response.extensions_mut(), first);
        ResponseFlags::record(response.extensions_mut(), second);
        let flags = ResponseFlags::of(response.extensions());
        assert_eq!(flags.to_string(), printed);
        assert_eq!(printed.parse::<ResponseFlags>().unwrap(), flags);
    }
}

/// An HTTP/1.1 response that does not parse, as hyper's client reports it, is a protocol
/// error: 502 with flag `UPE` in Envoy.
#[tokio::test]
async fn an_unparsable_http1_response_is_a_protocol_error() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    for answer in [&b"HTTP/9.9 200 OK\r\n\r\n"[..], b"HTTP/1.1 2x0 OK\r\n\r\n", b"\x16\x03\x01 not http\r\n\r\n"] {
        let (client, mut upstream) = tokio::io::duplex(4096);
        let (mut tx, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(client)).await.unwrap();
        tokio::spawn(conn);
        tokio::spawn(async move {
            let mut request = [0; 1024];
            let _ = upstream.read(&mut request).await;
            upstream.write_all(answer).await.unwrap();
            let _ = upstream.read(&mut request).await;
        });
        let req =
            http::Request::get("/").header("host", "x").body(http_body_util::Empty::<bytes::Bytes>::new()).unwrap();
        let err = tx.send_request(req).await.unwrap_err();
        let outcome = Outcome::from_error(&err);
        assert_eq!(outcome.failure(), Some(Failure::ProtocolError), "{err}");
        assert_eq!(outcome.response_flags().to_string(), "UPE");
    }
}
