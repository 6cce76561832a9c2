-- The data audit's fixture on old, shared by BenchmarkAudit (internal/plan)
-- and TestPlanAudit (cmd/tandem): orders maps to new's purchases (audit_new.sql)
-- through audit_map.yaml, with one planted row of each reason new rejects.
-- The reader replaces {{customers}} and {{rows}}.
CREATE TABLE customers (id int PRIMARY KEY, name text);
INSERT INTO customers SELECT g, 'c' || g FROM generate_series(1, {{customers}}) g;
CREATE TABLE orders (id bigint PRIMARY KEY, cust int, code varchar(40), note text, qty text, ref text,
	price numeric, amount int, legacy bool);
INSERT INTO orders SELECT g, 1 + g % {{customers}}, 'c' || g % 1000, 'n', g::text, 'r' || g, 1.50, 2, true
	FROM generate_series(1, {{rows}}) g;
UPDATE orders SET code = 'ABCDEFGHIJKLMNOP' WHERE id = 101; -- length: varchar(10) on new
UPDATE orders SET note = NULL WHERE id = 202;               -- NULL: NOT NULL on new
UPDATE orders SET cust = 9999 WHERE id = 303;               -- foreign key orphan
UPDATE orders SET ref = 'dup' WHERE id IN (404, 405);       -- unique duplicate
UPDATE orders SET price = -1 WHERE id = 505;                -- CHECK (total >= 0) on the computed total
UPDATE orders SET qty = '12a' WHERE id = 606;               -- type cast: text -> integer
