use aes::cipher::{Array, BlockCipherEncrypt, KeyInit};
use cdrguard::core::ff1::Ff1;
use cdrguard::core::pseudonym::{Keyring, MasterKey};
use cdrguard::core::purpose::Purpose;
fn main() {
    let k = Keyring::new(&[MasterKey::new("b", &[1; 32]).unwrap()]).unwrap();
    let n = 200_000u32;
    let inputs: Vec<String> = (0..n).map(|i| format!("+4670{:07}", i)).collect();
    let t = std::time::Instant::now();
    let mut x = 0;
    for s in &inputs {
        x += k.tokenise(Purpose::Marketing, s).unwrap().len();
    }
    println!("tokenise {:?}/op {x}", t.elapsed() / n);
    let f = Ff1::new(&[3; 32]);
    let t = std::time::Instant::now();
    let mut d = [1u8, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1];
    for _ in 0..n {
        f.encrypt(&[], &mut d);
    }
    println!("ff1 core {:?}/op {:?}", t.elapsed() / n, d);
    let a = aes::Aes256::new(&Array::from([7u8; 32]));
    let mut b = Array::from([0u8; 16]);
    let t = std::time::Instant::now();
    for _ in 0..n {
        a.encrypt_block(&mut b);
    }
    println!("aes block {:?}/op {:?}", t.elapsed() / n, b[0]);
    let t = std::time::Instant::now();
    for s in &inputs {
        x += k.pseudonym(Purpose::Analytics, "msisdn", s).len();
    }
    println!("blake3 {:?}/op {x}", t.elapsed() / n);
}
