use d7q_wire::frame::encode_frame;
use d7q_wire::*;
#[test]
fn tmp_quadratic() {
    let msg = Control::Have(Have { task: TaskId([0; 16]), pieces: vec![] });
    let mut stream = Vec::new();
    while stream.len() < 1 << 20 { encode_frame(&msg, &mut stream).unwrap(); }
    let t = std::time::Instant::now();
    let mut dec = FrameDecoder::new();
    dec.extend(&stream);
    let mut n = 0;
    while let Some(_m) = dec.next::<Control>().unwrap() { n += 1; }
    eprintln!("{n} frames from {} bytes in {:?}", stream.len(), t.elapsed());
}
