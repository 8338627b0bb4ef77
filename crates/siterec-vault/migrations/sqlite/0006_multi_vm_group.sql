-- Multi-VM consistency groups: the group a protected item belongs to (ARM
-- providerSpecificDetails.multiVmGroupName; NULL: none). A group is just
-- the items that name it: every member is on the same source agent and
-- under the same policy and cloud pairing (checked at enable time), and
-- that agent takes the group's recovery points at one instant. Disabling
-- protection of a member removes its row, and with it its membership.
ALTER TABLE protected_items ADD COLUMN multi_vm_group TEXT COLLATE NOCASE;
CREATE INDEX protected_items_by_group ON protected_items (multi_vm_group);
