//! `tlsmesh status`: reads the daemon's admin API and prints what it does.

use std::{
    io::{Read, Write},
    net::TcpStream,
    time::Duration,
};

use crate::cli::StatusArgs;

/// GETs `path` from the admin API and parses the JSON body.
pub fn fetch(addr: std::net::SocketAddr, path: &str) -> Result<serde_json::Value, Box<dyn std::error::Error>> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
        .map_err(|e| format!("cannot reach the tlsmesh admin API at {addr}: {e} (is the daemon running on this node?)"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    let body = buf.split_once("\r\n\r\n").map(|x| x.1).ok_or("malformed admin API response")?;
    Ok(serde_json::from_str(body)?)
}

/// Runs the command.
pub fn run(args: &StatusArgs) -> Result<(), Box<dyn std::error::Error>> {
    let dump = fetch(args.admin_addr, "/config_dump")?;
    let stats = fetch(args.admin_addr, "/stats")?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&serde_json::json!({"config_dump": dump, "stats": stats}))?);
        return Ok(());
    }
    println!("node {}", dump["config"]["node"].as_str().unwrap_or("?"));
    println!("\n{:<32} {:<11} {:<56} IPS", "POD", "MODE", "IDENTITY");
    for p in dump["pods"].as_array().into_iter().flatten() {
        let ips: Vec<String> = p["ips"].as_array().into_iter().flatten().filter_map(|v| v.as_str().map(String::from)).collect();
        println!(
            "{:<32} {:<11} {:<56} {}",
            p["key"].as_str().unwrap_or(""),
            p["mode"].as_str().unwrap_or(""),
            p["identity"].as_str().unwrap_or(""),
            ips.join(",")
        );
    }
    println!("\ncounters:");
    for (k, v) in stats["daemon"].as_object().into_iter().flatten() {
        println!("  {k:<28} {v}");
    }
    for (k, v) in stats["kernel"].as_object().into_iter().flatten() {
        println!("  kernel.{k:<21} {v}");
    }
    Ok(())
}
