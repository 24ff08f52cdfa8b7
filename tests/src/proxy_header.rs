//! PROXY protocol headers written by hand, from HAProxy's `proxy-protocol.txt`, for the
//! tests that play the outer balancer themselves (a header from an untrusted address, a v2
//! LOCAL command, a good connection beside bad ones). They are deliberately not the proxy's
//! own builders: a test of its parser must not share its code.

use std::net::{IpAddr, SocketAddr};

/// The 12-byte signature that starts every v2 header (section 2.2).
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// The longest v1 header a receiver must accept, its CRLF included (section 2.1: 107 bytes,
/// `PROXY UNKNOWN` with two full IPv6 addresses and ports). A v1 header without a CRLF in its
/// first this many bytes is not one.
pub const V1_MAX_LEN: usize = 107;

/// v2 version 2 with the `PROXY` command (a relayed connection).
const V2_PROXY: u8 = 0x21;
/// v2 version 2 with the `LOCAL` command (the balancer's own connection: a health check).
const V2_LOCAL: u8 = 0x20;
/// v2 family and protocol: `AF_INET` over `STREAM`.
const V2_TCP4: u8 = 0x11;
/// v2 family and protocol: `AF_INET6` over `STREAM`.
const V2_TCP6: u8 = 0x21;
/// v2 family and protocol: `AF_UNSPEC`, `UNSPEC`.
const V2_UNSPEC: u8 = 0x00;

/// A v1 header for a TCP connection from `source` to `destination` (one family for both).
pub fn v1(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let family = match (source.ip(), destination.ip()) {
        (IpAddr::V4(_), IpAddr::V4(_)) => "TCP4",
        (IpAddr::V6(_), IpAddr::V6(_)) => "TCP6",
        _ => panic!("a v1 header carries one family: {source} and {destination} differ"),
    };
    format!("PROXY {family} {} {} {} {}\r\n", source.ip(), destination.ip(), source.port(), destination.port())
        .into_bytes()
}

/// A v2 `PROXY` header for a TCP connection from `source` to `destination` (one family for
/// both), without TLVs.
pub fn v2(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let (family, mut addresses) = match (source.ip(), destination.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => (V2_TCP4, [s.octets(), d.octets()].concat()),
        (IpAddr::V6(s), IpAddr::V6(d)) => (V2_TCP6, [s.octets(), d.octets()].concat()),
        _ => panic!("a v2 header of these tests carries one family: {source} and {destination} differ"),
    };
    addresses.extend_from_slice(&source.port().to_be_bytes());
    addresses.extend_from_slice(&destination.port().to_be_bytes());
    v2_fixed(V2_PROXY, family, &addresses)
}

/// A v2 `LOCAL` header, as a balancer's health check sends it.
pub fn v2_local() -> Vec<u8> {
    v2_fixed(V2_LOCAL, V2_UNSPEC, &[])
}

/// The 16-byte fixed part of a v2 `PROXY` header over TCP/IPv4 that declares `len` bytes of
/// addresses and TLVs to follow (none of which it carries).
pub fn v2_fixed_part(len: u16) -> Vec<u8> {
    [&V2_SIGNATURE[..], &[V2_PROXY, V2_TCP4], &len.to_be_bytes()].concat()
}

/// A v2 header: signature, command, family, then `rest` (addresses and TLVs) with its length.
fn v2_fixed(command: u8, family: u8, rest: &[u8]) -> Vec<u8> {
    let len = u16::try_from(rest.len()).expect("a v2 header's rest fits its 16-bit length");
    [&V2_SIGNATURE[..], &[command, family], &len.to_be_bytes(), rest].concat()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_match_the_examples_of_the_spec() {
        let (s, d): (SocketAddr, SocketAddr) = ("192.0.2.7:5555".parse().unwrap(), "198.51.100.1:443".parse().unwrap());
        assert_eq!(v1(s, d), b"PROXY TCP4 192.0.2.7 198.51.100.1 5555 443\r\n");
        let h = v2(s, d);
        assert_eq!(&h[..12], &V2_SIGNATURE);
        assert_eq!(&h[12..16], &[0x21, 0x11, 0, 12]);
        assert_eq!(&h[16..], &[192, 0, 2, 7, 198, 51, 100, 1, 0x15, 0xb3, 0x01, 0xbb]);
        let (s6, d6): (SocketAddr, SocketAddr) = ("[2001:db8::7]:1".parse().unwrap(), "[::1]:2".parse().unwrap());
        assert_eq!(v1(s6, d6), b"PROXY TCP6 2001:db8::7 ::1 1 2\r\n");
        assert_eq!(v2(s6, d6).len(), 16 + 36);
        assert_eq!(v2_local(), [&V2_SIGNATURE[..], &[0x20, 0x00, 0, 0]].concat());
        assert_eq!(v2_fixed_part(u16::MAX)[14..], [0xff, 0xff]);
    }
}
