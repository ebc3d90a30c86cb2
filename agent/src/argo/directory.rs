//! A directory Argo stored without an archive (one object per file, under the artifact's key),
//! sent to the emissary as one tar stream, which it unpacks as it does any tar input.

use std::io;

use bytes::Bytes;
use http_body_util::BodyExt;

use crate::body::{Body, channel};
use crate::store::Store;

/// `files` (keys under `key/` and their sizes) as a streamed tar of their paths below `key`.
pub fn as_tar(store: Store, key: &str, files: Vec<(String, u64)>) -> Body {
    let (tx, body) = channel(4);
    let prefix = format!("{key}/");
    tokio::spawn(async move {
        let result: io::Result<()> = async {
            for (object, size) in files {
                let name = object.strip_prefix(&prefix).unwrap_or(&object);
                for block in headers(name, size)? {
                    if tx.send(Ok(block)).await.is_err() {
                        return Ok(());
                    }
                }
                let (_, mut data) = store
                    .get(&object)
                    .await
                    .map_err(|e| io::Error::other(e.to_string()))?
                    .ok_or_else(|| io::Error::other(format!("{object} went away")))?;
                let mut sent = 0u64;
                while let Some(frame) = data.frame().await {
                    if let Ok(chunk) = frame?.into_data() {
                        sent += chunk.len() as u64;
                        if tx.send(Ok(chunk)).await.is_err() {
                            return Ok(());
                        }
                    }
                }
                if sent != size {
                    return Err(io::Error::other(format!("{object} changed while read")));
                }
                let padding = (512 - size % 512) % 512;
                if padding > 0
                    && tx
                        .send(Ok(Bytes::from(vec![0; padding as usize])))
                        .await
                        .is_err()
                {
                    return Ok(());
                }
            }
            let _ = tx.send(Ok(Bytes::from(vec![0; 1024]))).await;
            Ok(())
        }
        .await;
        if let Err(e) = result {
            let _ = tx.send(Err(e)).await;
        }
    });
    body
}

/// The header blocks of a regular file `name` of `size` bytes: a GNU long-name entry first
/// when the name does not fit the header's 100 bytes.
fn headers(name: &str, size: u64) -> io::Result<Vec<Bytes>> {
    let mut blocks = Vec::new();
    let mut header = tar::Header::new_gnu();
    if name.len() >= 100 {
        let mut long = tar::Header::new_gnu();
        long.set_entry_type(tar::EntryType::GNULongName);
        long.as_gnu_mut().expect("a GNU header").name[..13].copy_from_slice(b"././@LongLink");
        long.set_size(name.len() as u64 + 1);
        long.set_mode(0o644);
        long.set_cksum();
        blocks.push(Bytes::copy_from_slice(long.as_bytes()));
        let mut data = name.as_bytes().to_vec();
        data.push(0);
        data.resize(data.len().div_ceil(512) * 512, 0);
        blocks.push(Bytes::from(data));
        header.as_gnu_mut().expect("a GNU header").name[..99]
            .copy_from_slice(&name.as_bytes()[..99]);
    } else {
        header.set_path(name)?;
    }
    header.set_entry_type(tar::EntryType::Regular);
    header.set_size(size);
    header.set_mode(0o644);
    header.set_cksum();
    blocks.push(Bytes::copy_from_slice(header.as_bytes()));
    Ok(blocks)
}

#[cfg(test)]
mod tests {
    use super::headers;

    #[test]
    fn long_names_get_a_gnu_long_name_entry() {
        assert_eq!(headers("etc/passwd", 12).unwrap().len(), 1);
        let name = "d/".repeat(60) + "file";
        let blocks = headers(&name, 1).unwrap();
        assert_eq!(blocks.len(), 3);
        assert_eq!(blocks[0][156], b'L');
    }
}
