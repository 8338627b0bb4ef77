//! Replies no honest server sends: the client must refuse them with a
//! protocol error (no panic, no huge allocation) and stop using the
//! connection, or report a server error and carry on.

use std::future::Future;
use std::pin::Pin;

use siterec_nbd::proto::*;
use siterec_nbd::{ConnectOptions, NbdClient, NbdError};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

const SIZE: u64 = 1 << 20;

type Replier = Box<dyn FnMut(u64, u16, u64, u32) -> Vec<u8> + Send>;
type GoReply = Box<dyn Fn() -> Vec<u8> + Send>;

fn opt_reply(opt: u32, kind: u32, data: &[u8]) -> Vec<u8> {
    let mut v = REPLY_MAGIC_OPT.to_be_bytes().to_vec();
    v.extend(opt.to_be_bytes());
    v.extend(kind.to_be_bytes());
    v.extend((data.len() as u32).to_be_bytes());
    v.extend(data);
    v
}

fn honest_go() -> Vec<u8> {
    let mut info = INFO_EXPORT.to_be_bytes().to_vec();
    info.extend(SIZE.to_be_bytes());
    info.extend((TFLAG_HAS_FLAGS | TFLAG_READ_ONLY).to_be_bytes());
    let mut v = opt_reply(OPT_GO, REP_INFO, &info);
    v.extend(opt_reply(OPT_GO, REP_ACK, &[]));
    v
}

fn chunk(flags: u16, kind: u16, cookie: u64, payload: &[u8]) -> Vec<u8> {
    let mut v = STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
    v.extend(flags.to_be_bytes());
    v.extend(kind.to_be_bytes());
    v.extend(cookie.to_be_bytes());
    v.extend((payload.len() as u32).to_be_bytes());
    v.extend(payload);
    v
}

fn data_chunk(flags: u16, cookie: u64, offset: u64, data: &[u8]) -> Vec<u8> {
    let mut p = offset.to_be_bytes().to_vec();
    p.extend(data);
    chunk(flags, REPLY_TYPE_OFFSET_DATA, cookie, &p)
}

/// A scripted server: an honest handshake (or `go` for NBD_OPT_GO), then
/// `reply` answers each request.
fn serve(
    mut s: DuplexStream,
    go: GoReply,
    mut reply: Replier,
) -> Pin<Box<dyn Future<Output = ()> + Send>> {
    Box::pin(async move {
        let mut hello = NBDMAGIC.to_be_bytes().to_vec();
        hello.extend(IHAVEOPT.to_be_bytes());
        hello.extend((FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        if s.write_all(&hello).await.is_err() || s.read_u32().await.is_err() {
            return;
        }
        loop {
            let Ok(_magic) = s.read_u64().await else {
                return;
            };
            let opt = s.read_u32().await.unwrap();
            let len = s.read_u32().await.unwrap();
            let mut data = vec![0u8; len as usize];
            s.read_exact(&mut data).await.unwrap();
            let out = match opt {
                OPT_STRUCTURED_REPLY => opt_reply(opt, REP_ACK, &[]),
                OPT_SET_META_CONTEXT => {
                    let mut m = 7u32.to_be_bytes().to_vec();
                    m.extend(b"base:allocation");
                    let mut v = opt_reply(opt, REP_META_CONTEXT, &m);
                    v.extend(opt_reply(opt, REP_ACK, &[]));
                    v
                }
                OPT_GO => go(),
                _ => opt_reply(opt, REP_ERR_UNSUP, &[]),
            };
            if s.write_all(&out).await.is_err() {
                return;
            }
            if opt == OPT_GO {
                break;
            }
        }
        loop {
            let mut req = [0u8; 28];
            if s.read_exact(&mut req).await.is_err() {
                return;
            }
            let kind = u16::from_be_bytes([req[6], req[7]]);
            let cookie = u64::from_be_bytes(req[8..16].try_into().unwrap());
            let offset = u64::from_be_bytes(req[16..24].try_into().unwrap());
            let len = u32::from_be_bytes(req[24..28].try_into().unwrap());
            if kind == CMD_DISC {
                return;
            }
            if s.write_all(&reply(cookie, kind, offset, len))
                .await
                .is_err()
            {
                return;
            }
        }
    })
}

async fn client_with(go: GoReply, reply: Replier) -> Result<NbdClient<DuplexStream>, NbdError> {
    let (a, b) = tokio::io::duplex(1 << 16);
    tokio::spawn(serve(b, go, reply));
    NbdClient::handshake(a, &ConnectOptions::new("").meta_context("base:allocation")).await
}

/// Asserts that a read gets a protocol error mentioning `needle`, and that
/// the connection is refused afterwards.
async fn read_is_refused(reply: Replier, needle: &str) {
    let mut c = client_with(Box::new(honest_go), reply).await.unwrap();
    let err = c.read(0, 4096).await.expect_err("must fail");
    assert!(matches!(err, NbdError::Protocol(_)), "{err:?}");
    assert!(err.to_string().contains(needle), "{err}");
    let again = c
        .read(0, 4096)
        .await
        .expect_err("connection must be broken");
    assert!(matches!(again, NbdError::ConnectionBroken(_)), "{again:?}");
}

#[tokio::test]
async fn data_outside_the_request_is_refused() {
    read_is_refused(
        Box::new(|cookie, _, _, _| data_chunk(REPLY_FLAG_DONE, cookie, 8192, &[1; 16])),
        "outside the requested range",
    )
    .await;
}

#[tokio::test]
async fn huge_chunk_length_is_refused_without_reading_it() {
    read_is_refused(
        Box::new(|cookie, _, _, _| {
            let mut v = chunk(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, cookie, &[]);
            let n = v.len();
            v[n - 4..].copy_from_slice(&0xffff_fff0u32.to_be_bytes());
            v
        }),
        "data chunk of 4294967280 bytes",
    )
    .await;
}

#[tokio::test]
async fn wrong_cookie_is_refused() {
    read_is_refused(
        Box::new(|cookie, _, off, len| {
            data_chunk(REPLY_FLAG_DONE, cookie + 100, off, &vec![0; len as usize])
        }),
        "cookie",
    )
    .await;
}

#[tokio::test]
async fn partial_and_overlapping_replies_are_refused() {
    read_is_refused(
        Box::new(|cookie, _, off, _| data_chunk(REPLY_FLAG_DONE, cookie, off, &[1; 2048])),
        "covered 2048 of 4096",
    )
    .await;
    read_is_refused(
        Box::new(|cookie, _, off, _| {
            let mut v = data_chunk(0, cookie, off, &[1; 3000]);
            v.extend(data_chunk(REPLY_FLAG_DONE, cookie, off + 2000, &[1; 2096]));
            v
        }),
        "overlap",
    )
    .await;
}

#[tokio::test]
async fn extents_past_the_export_are_refused() {
    let mut c = client_with(
        Box::new(honest_go),
        Box::new(|cookie, _, _, _| {
            let mut p = 7u32.to_be_bytes().to_vec();
            p.extend(0xffff_0000u32.to_be_bytes());
            p.extend(0u32.to_be_bytes());
            chunk(REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, cookie, &p)
        }),
    )
    .await
    .unwrap();
    let ctx = c.meta_context_id("base:allocation").unwrap();
    assert_eq!(ctx, 7);
    let err = c.block_status(ctx, 0, 4096).await.expect_err("must fail");
    assert!(err.to_string().contains("past the export size"), "{err}");
}

#[tokio::test]
async fn server_errors_are_reported_and_the_connection_stays_usable() {
    let mut first = true;
    let mut c = client_with(
        Box::new(honest_go),
        Box::new(move |cookie, _, off, len| {
            if std::mem::take(&mut first) {
                let mut p = 5u32.to_be_bytes().to_vec(); // EIO
                let msg = b"medium error";
                p.extend((msg.len() as u16).to_be_bytes());
                p.extend(msg);
                p.extend((off + 512).to_be_bytes());
                chunk(REPLY_FLAG_DONE, REPLY_TYPE_ERROR_OFFSET, cookie, &p)
            } else {
                data_chunk(REPLY_FLAG_DONE, cookie, off, &vec![9; len as usize])
            }
        }),
    )
    .await
    .unwrap();
    let err = c.read(0, 4096).await.expect_err("must fail");
    assert!(
        matches!(
            err,
            NbdError::Server {
                errno: 5,
                offset: 512,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("EIO") && err.to_string().contains("medium error"));
    assert_eq!(c.read(0, 4096).await.unwrap(), vec![9; 4096]);
}

#[tokio::test]
async fn oversized_option_reply_is_refused() {
    let go: GoReply = Box::new(|| {
        let mut v = opt_reply(OPT_GO, REP_INFO, &[]);
        let n = v.len();
        v[n - 4..].copy_from_slice(&(64u32 << 20).to_be_bytes());
        v
    });
    let err = client_with(go, Box::new(|_, _, _, _| Vec::new()))
        .await
        .err()
        .expect("must fail");
    assert!(matches!(err, NbdError::Protocol(_)), "{err:?}");
    assert!(err.to_string().contains("exceeds the limit"), "{err}");
}

#[tokio::test]
async fn go_without_export_info_is_refused() {
    let go: GoReply = Box::new(|| opt_reply(OPT_GO, REP_ACK, &[]));
    let err = client_with(go, Box::new(|_, _, _, _| Vec::new()))
        .await
        .err()
        .expect("must fail");
    assert!(err.to_string().contains("without NBD_INFO_EXPORT"), "{err}");
}
