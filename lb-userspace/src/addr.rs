//! Conversions between `std::net` addresses and the datapath's 16-byte address fields.

use std::net::IpAddr;

use lb_common::{FAMILY_V4, FAMILY_V6};

/// The datapath form: `[u32; 4]` in network byte order (IPv4 in the first word) and a family.
pub fn to_words(ip: IpAddr) -> ([u32; 4], u8) {
    match ip {
        IpAddr::V4(v4) => ([u32::from_ne_bytes(v4.octets()), 0, 0, 0], FAMILY_V4),
        IpAddr::V6(v6) => {
            let o = v6.octets();
            let mut w = [0u32; 4];
            for (i, w) in w.iter_mut().enumerate() {
                *w = u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]]);
            }
            (w, FAMILY_V6)
        }
    }
}

/// The network-order bytes of an address (its Maglev identity).
pub fn bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_are_network_order_in_memory() {
        let (w, f) = to_words("10.1.2.3".parse().unwrap());
        assert_eq!(f, FAMILY_V4);
        assert_eq!(w[0].to_ne_bytes(), [10, 1, 2, 3]);
        let (w, f) = to_words("fd00::1".parse().unwrap());
        assert_eq!(f, FAMILY_V6);
        assert_eq!(w[0].to_ne_bytes(), [0xfd, 0, 0, 0]);
        assert_eq!(w[3].to_ne_bytes(), [0, 0, 0, 1]);
    }
}
