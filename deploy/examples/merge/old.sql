-- The old store: accounts and the profiles some of them have, sharing the key.
CREATE TABLE accounts (
    id    bigint PRIMARY KEY,
    name  text NOT NULL,
    email text
);
CREATE TABLE profiles (
    user_id bigint PRIMARY KEY,
    bio     text,
    avatar  bytea
);
