//! Fault injection: a TCP proxy the test can cut and restore (to take Postgres "down" for the
//! services behind it without touching the shared server).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use tokio::io::copy_bidirectional;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct Proxy {
    pub port: u16,
    up: Arc<AtomicBool>,
    /// Bumped on every cut: connections of an older generation are closed.
    generation: watch::Sender<u64>,
    pub refused: Arc<AtomicU64>,
}

impl Proxy {
    pub async fn start(target: (String, u16)) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let up = Arc::new(AtomicBool::new(true));
        let (generation, _) = watch::channel(0u64);
        let refused = Arc::new(AtomicU64::new(0));
        let (up2, gen2, refused2) = (up.clone(), generation.clone(), refused.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    return;
                };
                if !up2.load(Ordering::SeqCst) {
                    refused2.fetch_add(1, Ordering::SeqCst);
                    drop(client);
                    continue;
                }
                let target = target.clone();
                let mut rx = gen2.subscribe();
                let born = *rx.borrow();
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect((target.0.as_str(), target.1)).await
                    else {
                        return;
                    };
                    tokio::select! {
                        _ = copy_bidirectional(&mut client, &mut server) => {}
                        _ = async { while rx.changed().await.is_ok() { if *rx.borrow() != born { break; } } } => {}
                    }
                });
            }
        });
        Proxy {
            port,
            up,
            generation,
            refused,
        }
    }

    /// Drop every open connection and refuse new ones.
    pub fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        self.generation.send_modify(|g| *g += 1);
    }

    pub fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}
