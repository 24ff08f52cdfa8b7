//! End-to-end test support: the proxy harness and the NTLM test backend.
