//! A minimal DNS client: the IPv4 address of a name, as the pod's `/etc/resolv.conf` says to
//! find it (its first nameserver, its search list and `ndots`). Why not getaddrinfo: statically
//! linked, glibc's resolver costs 130 KB of the 2 MB budget; one A query over UDP is all the
//! emissary needs (the node agent's Service name).

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::time::Duration;

/// The address of `host`, trying the search domains as a resolver would.
pub fn lookup(host: &str) -> Result<Ipv4Addr, String> {
    let conf = std::fs::read_to_string("/etc/resolv.conf")
        .map_err(|e| format!("cannot resolve {host:?}: /etc/resolv.conf: {e}"))?;
    let (server, candidates) = plan(&conf, host)?;
    let socket = UdpSocket::bind(SocketAddr::from(([0, 0, 0, 0], 0)))
        .map_err(|e| format!("DNS socket: {e}"))?;
    socket
        .set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(|e| format!("DNS socket: {e}"))?;
    for name in &candidates {
        for _ in 0..2 {
            match query(&socket, server, name) {
                Ok(Some(ip)) => return Ok(ip),
                Ok(None) => break,  // no such name: the next candidate
                Err(_) => continue, // lost or late: once more
            }
        }
    }
    Err(format!(
        "cannot resolve {host:?} (tried {} with nameserver {server})",
        candidates.join(", ")
    ))
}

/// The nameserver and the names to ask for, in order.
fn plan(conf: &str, host: &str) -> Result<(SocketAddr, Vec<String>), String> {
    let mut server = None;
    let mut search = Vec::new();
    let mut ndots = 1;
    for line in conf.lines() {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("nameserver") if server.is_none() => {
                server = words.next().and_then(|ip| ip.parse::<Ipv4Addr>().ok());
            }
            Some("search") => search = words.map(str::to_owned).collect(),
            Some("options") => {
                for option in words {
                    if let Some(n) = option.strip_prefix("ndots:").and_then(|n| n.parse().ok()) {
                        ndots = n;
                    }
                }
            }
            _ => {}
        }
    }
    let server = server.ok_or("/etc/resolv.conf names no IPv4 nameserver")?;
    let host = host.trim_end_matches('.');
    let searched = search.iter().map(|d| format!("{host}.{d}"));
    let candidates = if host.matches('.').count() >= ndots {
        std::iter::once(host.to_owned()).chain(searched).collect()
    } else {
        searched.chain(std::iter::once(host.to_owned())).collect()
    };
    Ok((SocketAddr::from((server, 53)), candidates))
}

/// One A query: `Ok(None)` when the name does not exist or has no A record.
fn query(socket: &UdpSocket, server: SocketAddr, name: &str) -> std::io::Result<Option<Ipv4Addr>> {
    let id = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(7, |d| d.subsec_nanos() as u16);
    let mut packet = Vec::with_capacity(64);
    packet.extend_from_slice(&id.to_be_bytes());
    packet.extend_from_slice(&[1, 0, 0, 1, 0, 0, 0, 0, 0, 0]); // recursion desired, 1 question
    for label in name.split('.').filter(|l| !l.is_empty()) {
        packet.push(label.len().min(63) as u8);
        packet.extend_from_slice(&label.as_bytes()[..label.len().min(63)]);
    }
    packet.extend_from_slice(&[0, 0, 1, 0, 1]); // root, type A, class IN
    socket.send_to(&packet, server)?;
    let mut answer = [0u8; 1500];
    loop {
        let (n, from) = socket.recv_from(&mut answer)?;
        if from == server && n >= 12 && answer[..2] == id.to_be_bytes() {
            return Ok(parse(&answer[..n]));
        }
    }
}

/// The first A record of an answer.
fn parse(m: &[u8]) -> Option<Ipv4Addr> {
    let word = |i: usize| Some(u16::from_be_bytes([*m.get(i)?, *m.get(i + 1)?]));
    if m[3] & 0x0f != 0 {
        return None; // an error, NXDOMAIN among them
    }
    let (questions, answers) = (word(4)?, word(6)?);
    let mut i = 12;
    let skip_name = |mut i: usize| -> Option<usize> {
        loop {
            let len = *m.get(i)? as usize;
            if len == 0 {
                return Some(i + 1);
            }
            if len & 0xc0 == 0xc0 {
                return Some(i + 2); // a pointer ends the name
            }
            i += 1 + len;
        }
    };
    for _ in 0..questions {
        i = skip_name(i)? + 4;
    }
    for _ in 0..answers {
        i = skip_name(i)?;
        let (kind, len) = (word(i)?, word(i + 8)? as usize);
        let data = m.get(i + 10..i + 10 + len)?;
        if kind == 1 && len == 4 {
            return Some(Ipv4Addr::new(data[0], data[1], data[2], data[3]));
        }
        i += 10 + len;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn search_domains_come_first_for_short_names() {
        let conf = "nameserver 10.96.0.10\nsearch argo.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5\n";
        let (server, names) = plan(conf, "emissary-agent.emissary-system.svc").unwrap();
        assert_eq!(server.to_string(), "10.96.0.10:53");
        assert_eq!(names[2], "emissary-agent.emissary-system.svc.cluster.local");
        assert_eq!(names.last().unwrap(), "emissary-agent.emissary-system.svc");
        let (_, names) = plan("nameserver 1.1.1.1\n", "a.example.com").unwrap();
        assert_eq!(names, ["a.example.com"]);
    }

    #[test]
    fn an_answer_gives_its_a_record() {
        // Header, question "a.b" A IN, answer by pointer: A 10.0.0.7.
        let mut m = vec![0, 1, 0x81, 0x80, 0, 1, 0, 1, 0, 0, 0, 0];
        m.extend_from_slice(&[1, b'a', 1, b'b', 0, 0, 1, 0, 1]);
        m.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 30, 0, 4, 10, 0, 0, 7]);
        assert_eq!(parse(&m), Some(Ipv4Addr::new(10, 0, 0, 7)));
        m[3] = 0x83; // NXDOMAIN
        assert_eq!(parse(&m), None);
    }
}
