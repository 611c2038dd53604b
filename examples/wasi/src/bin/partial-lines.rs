//! Exercises the line rules: a line in several writes, a CRLF line, a 100 KiB
//! line, invalid UTF-8, an empty line and a final line without a newline.
use std::io::Write;
fn main() {
    let mut out = std::io::stdout().lock();
    for part in ["one ", "line ", "in ", "pieces\n"] {
        out.write_all(part.as_bytes()).unwrap();
        out.flush().unwrap();
    }
    out.write_all(b"crlf line\r\n").unwrap();
    out.write_all(&vec![b'x'; 100 * 1024]).unwrap();
    out.write_all(b"\n").unwrap();
    out.write_all(b"bad \xff\xfe utf8\n").unwrap();
    out.write_all(b"\n").unwrap();
    out.write_all(b"no newline at the end").unwrap();
    out.flush().unwrap();
}
