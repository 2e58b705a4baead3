// Opens image files with Bio-Formats the way QuPath's BioFormatsImageServer does, and reports what it sees.
//
//   java -cp bioformats_package.jar tests/interop/Probe.java OUT_DIR LIST_FILE
//
// LIST_FILE holds one path per line (UTF-8). For the i-th file the probe writes OUT_DIR/<i>.json and the raw
// bytes of every plane of resolution 0 and of the smallest resolution as OUT_DIR/<i>-r<res>-p<plane>.bin,
// exactly as IFormatReader.openBytes returns them. One JVM serves many files (JVM start-up is the slow part).
// Mirrors QuPath's ReaderPool/BioFormatsImageServer: ImageReader, setFlattenedResolutions(false), an OME-XML
// (OMEPyramidStore) metadata store, series 0, channel count = getSizeC(), isRGB = isRGB() && UINT8 && 3 channels,
// channel names from the metadata store, pixel size in micrometres.
import java.io.File;
import java.io.FileOutputStream;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.List;
import java.util.Locale;

import loci.common.DebugTools;
import loci.formats.FormatTools;
import loci.formats.IFormatReader;
import loci.formats.ImageReader;
import loci.formats.MetadataTools;
import loci.formats.ReaderWrapper;
import loci.formats.meta.IMetadata;
import loci.formats.ome.OMEPyramidStore;
import loci.formats.services.OMEXMLService;
import loci.common.services.ServiceFactory;
import ome.units.UNITS;
import ome.units.quantity.Length;
import ome.xml.model.primitives.Color;

public class Probe {
    static String q(String s) {
        if (s == null) return "null";
        StringBuilder b = new StringBuilder("\"");
        for (int i = 0; i < s.length(); i++) {
            char c = s.charAt(i);
            switch (c) {
                case '"': b.append("\\\""); break;
                case '\\': b.append("\\\\"); break;
                case '\n': b.append("\\n"); break;
                case '\r': b.append("\\r"); break;
                case '\t': b.append("\\t"); break;
                default:
                    if (c < 0x20) b.append(String.format("\\u%04x", (int) c)); else b.append(c);
            }
        }
        return b.append('"').toString();
    }

    static String num(Double d) {
        return d == null || d.isNaN() ? "null" : Double.toString(d);
    }

    /** A count from the metadata store; 0 where the store has no such element (it throws then). */
    static int count(java.util.function.IntSupplier f) {
        try {
            return f.getAsInt();
        } catch (NullPointerException e) {
            return 0;
        }
    }

    static String probe(String path, Path out, int index) throws Exception {
        OMEPyramidStore meta = (OMEPyramidStore) MetadataTools.createOMEXMLMetadata();
        IFormatReader reader = new ImageReader();
        reader.setFlattenedResolutions(false);
        reader.setMetadataStore(meta);
        StringBuilder j = new StringBuilder("{");
        try {
            reader.setId(path);
            reader.setSeries(0);
            IFormatReader inner = reader;
            while (true) {
                if (inner instanceof ImageReader) inner = ((ImageReader) inner).getReader();
                else if (inner instanceof ReaderWrapper) inner = ((ReaderWrapper) inner).getReader();
                else break;
            }
            int nChannels = reader.getSizeC();
            int pixelType = reader.getPixelType();
            boolean isRGB = reader.isRGB() && pixelType == FormatTools.UINT8 && nChannels == 3;
            j.append("\"file\":").append(q(path));
            j.append(",\"reader\":").append(q(inner.getClass().getName()));
            j.append(",\"format\":").append(q(reader.getFormat()));
            j.append(",\"series_count\":").append(reader.getSeriesCount());
            j.append(",\"image_name\":").append(q(meta.getImageCount() > 0 ? meta.getImageName(0) : null));
            j.append(",\"size_x\":").append(reader.getSizeX()).append(",\"size_y\":").append(reader.getSizeY());
            j.append(",\"size_c\":").append(nChannels).append(",\"size_z\":").append(reader.getSizeZ());
            j.append(",\"size_t\":").append(reader.getSizeT());
            j.append(",\"image_count\":").append(reader.getImageCount());
            j.append(",\"rgb_channel_count\":").append(reader.getRGBChannelCount());
            j.append(",\"pixel_type\":").append(q(FormatTools.getPixelTypeString(pixelType)));
            j.append(",\"bf_is_rgb\":").append(reader.isRGB());
            j.append(",\"is_rgb\":").append(isRGB);
            j.append(",\"interleaved\":").append(reader.isInterleaved());
            j.append(",\"little_endian\":").append(reader.isLittleEndian());
            j.append(",\"dimension_order\":").append(q(reader.getDimensionOrder()));
            j.append(",\"tile\":[").append(reader.getOptimalTileWidth()).append(',')
                .append(reader.getOptimalTileHeight()).append(']');
            // Channels as QuPath names them (metadata channel count must equal getSizeC for names to be used).
            int metaChannels = meta.getChannelCount(0);
            j.append(",\"meta_channel_count\":").append(metaChannels);
            j.append(",\"channel_names\":[");
            List<String> names = new ArrayList<>();
            for (int c = 0; c < metaChannels; c++) names.add(meta.getChannelName(0, c));
            for (int c = 0; c < names.size(); c++) j.append(c > 0 ? "," : "").append(q(names.get(c)));
            j.append("],\"samples_per_pixel\":[");
            for (int c = 0; c < metaChannels; c++) {
                var spp = meta.getChannelSamplesPerPixel(0, c);
                j.append(c > 0 ? "," : "").append(spp == null ? "null" : Integer.toString(spp.getValue()));
            }
            j.append(']');
            Length px = meta.getPixelsPhysicalSizeX(0), py = meta.getPixelsPhysicalSizeY(0);
            j.append(",\"physical_size_x\":").append(px == null ? "null" : num(px.value().doubleValue()));
            j.append(",\"physical_size_y\":").append(py == null ? "null" : num(py.value().doubleValue()));
            j.append(",\"physical_size_unit\":").append(q(px == null ? null : px.unit().getSymbol()));
            j.append(",\"pixel_width_um\":").append(px == null ? "null" : num(px.value(UNITS.MICROMETER).doubleValue()));
            j.append(",\"pixel_height_um\":").append(py == null ? "null" : num(py.value(UNITS.MICROMETER).doubleValue()));
            // The provenance as Bio-Formats hands it to OMERO/QuPath: MapAnnotations and CommentAnnotations.
            j.append(",\"map_annotations\":[");
            for (int a = 0; a < count(() -> meta.getMapAnnotationCount()); a++) {
                j.append(a > 0 ? "," : "").append("{\"id\":").append(q(meta.getMapAnnotationID(a)));
                j.append(",\"namespace\":").append(q(meta.getMapAnnotationNamespace(a))).append(",\"values\":[");
                var pairs = meta.getMapAnnotationValue(a);
                for (int k = 0; pairs != null && k < pairs.size(); k++) {
                    j.append(k > 0 ? "," : "").append('[').append(q(pairs.get(k).getName())).append(',')
                        .append(q(pairs.get(k).getValue())).append(']');
                }
                j.append("]}");
            }
            j.append("],\"comment_annotations\":[");
            for (int a = 0; a < count(() -> meta.getCommentAnnotationCount()); a++) {
                j.append(a > 0 ? "," : "").append("{\"namespace\":").append(q(meta.getCommentAnnotationNamespace(a)));
                j.append(",\"value\":").append(q(meta.getCommentAnnotationValue(a))).append('}');
            }
            j.append(']');
            // Every resolution, the way QuPath builds its levels.
            int nRes = reader.getResolutionCount();
            j.append(",\"resolution_count\":").append(nRes).append(",\"levels\":[");
            for (int r = 0; r < nRes; r++) {
                reader.setResolution(r);
                j.append(r > 0 ? "," : "").append('[').append(reader.getSizeX()).append(',').append(reader.getSizeY())
                    .append(']');
            }
            j.append("],\"dumps\":[");
            int[] dumpRes = nRes > 1 ? new int[] {0, nRes - 1} : new int[] {0};
            boolean first = true;
            for (int r : dumpRes) {
                reader.setResolution(r);
                for (int p = 0; p < reader.getImageCount(); p++) {
                    byte[] bytes = reader.openBytes(p);
                    String name = index + "-r" + r + "-p" + p + ".bin";
                    try (FileOutputStream f = new FileOutputStream(out.resolve(name).toFile())) {
                        f.write(bytes);
                    }
                    j.append(first ? "" : ",").append("{\"resolution\":").append(r).append(",\"plane\":").append(p)
                        .append(",\"zct\":[");
                    int[] zct = reader.getZCTCoords(p);
                    j.append(zct[0]).append(',').append(zct[1]).append(',').append(zct[2]).append("],\"width\":")
                        .append(reader.getSizeX()).append(",\"height\":").append(reader.getSizeY())
                        .append(",\"file\":").append(q(name)).append('}');
                    first = false;
                }
            }
            j.append(']');
            reader.setResolution(0);
            // The OME-XML Bio-Formats would hand on (what OMERO import stores).
            OMEXMLService service = new ServiceFactory().getInstance(OMEXMLService.class);
            String xml = service.getOMEXML(meta);
            Files.write(out.resolve(index + "-ome.xml"), xml.getBytes(StandardCharsets.UTF_8));
            j.append(",\"ome_xml\":").append(q(index + "-ome.xml"));
        } catch (Throwable e) {
            j.setLength(1);
            j.append("\"file\":").append(q(path)).append(",\"error\":").append(q(e.toString()));
        } finally {
            reader.close();
        }
        return j.append('}').toString();
    }

    public static void main(String[] args) throws Exception {
        Locale.setDefault(Locale.ROOT);
        DebugTools.setRootLevel("OFF");
        Path out = Path.of(args[0]);
        List<String> files = Files.readAllLines(Path.of(args[1]), StandardCharsets.UTF_8);
        int i = 0;
        for (String f : files) {
            if (f.isEmpty()) continue;
            String json = probe(f, out, i);
            Files.write(out.resolve(i + ".json"), json.getBytes(StandardCharsets.UTF_8));
            i++;
        }
        System.out.println("probed " + i);
    }
}
