//! The IP addresses of the calling thread's network namespace. Run inside a pod's namespace with
//! [`NetnsWorker::run_blocking`](crate::netns::NetnsWorker::run_blocking).

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    ptr,
};

/// Every address on every interface (`getifaddrs`), down or up: a pod's address is its own
/// whether or not the link is up yet.
pub fn interface_addresses() -> io::Result<Vec<IpAddr>> {
    let mut list: *mut libc::ifaddrs = ptr::null_mut();
    // SAFETY: `list` is a valid place for getifaddrs to store the head of the list it allocates.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut addresses = Vec::new();
    let mut node = list;
    while !node.is_null() {
        // SAFETY: `node` is an entry of the list getifaddrs returned, which is freed only below.
        let entry = unsafe { &*node };
        // SAFETY: `ifa_addr` is null or points to a sockaddr of the family it names.
        if let Some(address) = unsafe { ip_of(entry.ifa_addr) } {
            addresses.push(address);
        }
        node = entry.ifa_next;
    }
    // SAFETY: `list` came from getifaddrs and no reference into it outlives this call.
    unsafe { libc::freeifaddrs(list) };
    Ok(addresses)
}

/// The IP address in `addr`, if it is an IPv4 or IPv6 one.
///
/// # Safety
/// `addr` is null or points to a sockaddr whose size matches its `sa_family`.
unsafe fn ip_of(addr: *const libc::sockaddr) -> Option<IpAddr> {
    if addr.is_null() {
        return None;
    }
    // SAFETY: non-null, and every sockaddr starts with its family (the caller's promise).
    match i32::from(unsafe { (*addr).sa_family }) {
        libc::AF_INET => {
            // SAFETY: an AF_INET sockaddr is a sockaddr_in; read unaligned, as libc does not
            // promise the stronger alignment.
            let v4 = unsafe { ptr::read_unaligned(addr.cast::<libc::sockaddr_in>()) };
            Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(v4.sin_addr.s_addr))))
        }
        libc::AF_INET6 => {
            // SAFETY: an AF_INET6 sockaddr is a sockaddr_in6; read unaligned as above.
            let v6 = unsafe { ptr::read_unaligned(addr.cast::<libc::sockaddr_in6>()) };
            Some(IpAddr::V6(Ipv6Addr::from(v6.sin6_addr.s6_addr)))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_the_loopback_address() {
        let addresses = interface_addresses().expect("getifaddrs");
        assert!(
            addresses.contains(&IpAddr::V4(Ipv4Addr::LOCALHOST)),
            "{addresses:?}"
        );
    }
}
