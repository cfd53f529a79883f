-- cxrnode demo PACS: route chest radiographs to the AI node as they arrive.
--
-- Orthanc calls OnStoredInstance once for every instance it stores. Computed and digital
-- radiographs (CR, DX) are forwarded to the DICOM modality named "cxrnode" (see
-- DicomModalities in orthanc.json), and so are Secondary Captures whose Modality says CR or
-- DX (digitised films, re-wrapped radiographs; the node decides from the header whether they
-- show a chest). Everything else stays put, in particular the node's own AI draft report (SR)
-- and Secondary Capture (Modality OT): forwarding those back would make a loop.

local RADIOGRAPH_SOP_CLASSES = {
  ["1.2.840.10008.5.1.4.1.1.1"] = true,        -- CR Image Storage
  ["1.2.840.10008.5.1.4.1.1.1.1"] = true,      -- Digital X-Ray Image Storage, For Presentation
  ["1.2.840.10008.5.1.4.1.1.1.1.1"] = true,    -- Digital X-Ray Image Storage, For Processing
  ["1.2.840.10008.5.1.4.1.1.7"] = true,        -- Secondary Capture Image Storage
  ["1.2.840.10008.5.1.4.1.1.7.2"] = true,      -- Multi-frame Grayscale Byte SC Image Storage
  ["1.2.840.10008.5.1.4.1.1.7.3"] = true,      -- Multi-frame Grayscale Word SC Image Storage
}
local RADIOGRAPH_MODALITIES = { CR = true, DX = true }

function OnStoredInstance(instanceId, tags, metadata, origin)
  local sopClass = tags["SOPClassUID"] or metadata["SopClassUid"]
  if RADIOGRAPH_MODALITIES[tags["Modality"]] and RADIOGRAPH_SOP_CLASSES[sopClass] then
    SendToModality(instanceId, "cxrnode")
  end
end
