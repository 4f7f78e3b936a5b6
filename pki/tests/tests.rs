mod join_flow;
mod tls_handshakes;
mod verifiers;
