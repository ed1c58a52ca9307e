"""Password schemes: the stored forms a users file or the state store may hold, parsed once
and verified on demand.

One entry is one `StoredPassword`. Parsing is cheap (no hashing: a users file of 100,000
entries loads in well under a second); `verify` is the slow part and runs in a hash thread
(users.Hasher), except for entries whose `cheap` says they are fast. Modules: base (the
interface), digests and modular (the schemes), reading (`parse`), making (`hash_entry`).
Forms accepted:

- `{SCHEME}data` as Dovecot's passwd-file writes it (`{SHA512-CRYPT}$6$...`, `{PLAIN}pw`,
  `{SSHA256.b64}...`, ...), scheme names in any case, with Dovecot's `.b64`/`.base64`/`.hex`
  encodings and its guess between hex and base64 for the fixed-size digests;
- `$scrypt$n=..,r=..,p=..$salt$hash`, geventpop3's own default;
- a bare modular-crypt hash of a complete, exact shape (`$1$`, `$5$`, `$6$`, `$2y$`, `$y$`,
  `$7$`, `$argon2id$`...): that hash, as Dovecot's passwd-file (default scheme CRYPT) reads it;
- anything else: the password itself (the original `name:password` format). A plain
  password is never kept: only a keyed digest of it (`plain_key`), compared in constant time.

Weak schemes (Dovecot 2.4's list: MD5, MD5-CRYPT, SMD5, PLAIN-MD4, PLAIN-MD5, LDAP-MD5,
HMAC-MD5, DES-CRYPT, and DES or `$1$` hashes under CRYPT; also `$3$` NT hashes) are refused
unless `allow_weak`; costs that would make every failed login take seconds are refused. A
password holding a NUL byte never matches a Dovecot hash (Dovecot's C strings would end
there; no real password holds one).
"""

from geventpop3.auth.schemes.base import DEFAULT_COST, WEAK_HINT, Cost, SchemeError, StoredPassword
from geventpop3.auth.schemes.digests import Digest, KeyedPlain, Pbkdf2, Scram, Scrypt
from geventpop3.auth.schemes.making import HASH_SCHEMES, hash_entry, hash_password
from geventpop3.auth.schemes.modular import Argon2, Bcrypt, Crypt
from geventpop3.auth.schemes.reading import parse

__all__ = [
    "DEFAULT_COST", "HASH_SCHEMES", "WEAK_HINT", "Argon2", "Bcrypt", "Cost", "Crypt", "Digest", "KeyedPlain",
    "Pbkdf2", "SchemeError", "Scram", "Scrypt", "StoredPassword", "hash_entry", "hash_password", "parse",
]
