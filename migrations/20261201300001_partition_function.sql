-- Issue 12: the partition of a user in SQL, exactly as `queue::partition_of` computes it (FNV-1a,
-- 64 bit, over the UUID's 16 bytes, modulo the partition count), so the reconciliation sweep
-- selects only the accounts of the partitions a worker owns. `numeric` keeps the 64-bit
-- arithmetic exact (bigint would overflow); XOR with one byte touches only the low 8 bits.
CREATE FUNCTION sparky_partition(u uuid, partitions integer) RETURNS integer
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
DECLARE
    h numeric := 14695981039346656037;
    b bytea := uuid_send(u);
    lo integer;
BEGIN
    FOR i IN 0..15 LOOP
        lo := (h % 256)::integer;
        h := h - lo + (lo # get_byte(b, i));
        h := (h * 1099511628211) % 18446744073709551616;
    END LOOP;
    RETURN (h % partitions)::integer;
END $$;
